"""fedcomp: simulate communication-efficient federated learning with real payloads."""

import os

# OpenMP (libgomp, in PyTorch's Linux wheels) keeps a finished parallel region's threads
# spinning for about 300,000 pause loops (~15 ms here) before they sleep; on a busy machine
# (the other runs of a sweep, pool workers) that spinning takes the cores from the work. With
# 10,000 loops (~0.5 ms) a cnn4 training step (batch 32, 2 threads, two other busy processes on
# 2 cores) took 49 ms instead of 118 ms, and on the idle machine 18.8 ms against 21.2 ms;
# never spinning (OMP_WAIT_POLICY=PASSIVE) made an idle mlp step 3x slower. OpenMP reads this
# when torch loads, so it is set before anything imports torch; a value already set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
