#!/usr/bin/env bash
# FedAvg on FashionMNIST (cnn4, 10 clients) for three label-skew levels and two seeds.
# Usage: experiments/partition_sweep/run.sh [extra overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/fedcomp -m partition=dirichlet partition.alpha=0.1,0.5,1.0 seed=0,1 num_rounds=10 \
  progress=false hydra.sweep.dir=multirun/partition_sweep "$@"
.venv/bin/python - <<'PY'
import json
from pathlib import Path

rows = [json.loads(p.read_text()) for p in sorted(Path("multirun/partition_sweep").glob("*/summary.json"))]
print("| alpha | seed | final acc | best acc | MB up | MB down |")
print("|---|---|---|---|---|---|")
for s in rows:
    c = s["config"]
    print(f"| {c['partition']['alpha']} | {c['seed']} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} "
          f"| {s['total_bytes_up'] / 1e6:.1f} | {s['total_bytes_down'] / 1e6:.1f} |")
PY
