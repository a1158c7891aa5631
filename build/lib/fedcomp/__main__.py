from fedcomp.cli import main

main()
