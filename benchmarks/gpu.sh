#!/usr/bin/env bash
# What needs a CUDA machine, in one call (a lent GPU's time is short), each stage bounded:
#   tests  the CUDA tests (tests/test_device.py, the engines and the batched cohort on the GPU);
#   cuda   the scale table with train.device=cuda (plain loop, inline, batched, pool workers sharing the GPU);
#   phases where the batched engine's GPU round goes (benchmarks/phases.py: mlp FedAvg, top-k + EF and HGC; cnn4 FedAvg, top-k + EF);
#   cpu    the scale table on the CPU at all of the machine's cores (pool: one worker per core).
# Usage: benchmarks/gpu.sh OUT_DIR [STAGE ...]   (default: tests cuda phases cpu; PYTHON picks the
# interpreter, ROUNDS the scale tables' rounds, PHASES_DEVICE=cpu the phases stage's device)
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [tests] [cuda] [phases] [cpu]}
shift
py=${PYTHON:-python3}
rounds=${ROUNDS:-5}
mkdir -p "$out"
status=0
for stage in "${@:-tests cuda phases cpu}"; do
  for s in $stage; do
    case $s in
      tests) timeout 240 "$py" -m pytest -q -p no:cacheprovider -rs --timeout 180 tests/test_device.py \
               tests/test_engines.py::test_engines_agree_on_cuda tests/test_engines.py::test_cohort_training_equals_the_sequential_loop_on_cuda \
               2>&1 | tee "$out/tests.log" ;;
      cuda) timeout 300 "$py" benchmarks/scale.py --device cuda --rounds "$rounds" --engines inline batched pool \
              --out "$out/scale_cuda.json" 2>&1 | tee "$out/scale_cuda.log" ;;
      phases) for cell in "mlp fedavg" "mlp topk1%+ef" "mlp hgc" "cnn4 fedavg" "cnn4 topk1%+ef"; do
                set -- $cell
                timeout 120 "$py" benchmarks/phases.py --model "$1" --method "$2" --engine batched --device "${PHASES_DEVICE:-cuda}" \
                  --out "$out/phases-$1-${2%%%*}.json" 2>&1 | tee -a "$out/phases.log"
              done
              # one file for the lot (a lease brings back few files)
              "$py" -c 'import json, pathlib, sys; fs = sorted(pathlib.Path(sys.argv[1]).glob("phases-*.json")); pathlib.Path(sys.argv[1], "phases.json").write_text(json.dumps([json.loads(f.read_text()) for f in fs], indent=2)); [f.unlink() for f in fs]' "$out" ;;
      cpu) timeout 300 "$py" benchmarks/scale.py --rounds "$rounds" --methods fedavg 'topk1%+ef' \
             --engines inline pool batched batched_pool --out "$out/scale_cpu.json" 2>&1 | tee "$out/scale_cpu.log" ;;
      *) echo "unknown stage $s" >&2; exit 2 ;;
    esac
    status=$((status | PIPESTATUS[0]))
  done
done
exit $status
