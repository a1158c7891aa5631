"""Simulation overhead: fedcomp's Flower rounds vs the same local training as a plain loop.

For each client count, the same work (model, data, 8 local SGD steps of batch 32 per client,
data-weighted averaging) runs as
  plain   - a sequential PyTorch loop with no Flower, no payloads;
  inline  - fedcomp with the in-process Flower Grid (the default backend);
  ray     - fedcomp on Flower's Ray simulation engine.
Per-round time is the median over rounds 2..R-1 (round 1 warms up; the last round also runs
the test-set evaluation), so start-up (Ray's ~20 s) is reported separately, not averaged in.

    python benchmarks/overhead.py [--clients 10 100] [--rounds 10] [--backends inline ray]

Prints a table and writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

# isort: off
import fedcomp  # noqa: F401 -- before torch, so that fedcomp's OpenMP spin limit holds here as in a run
# isort: on
import torch

from fedcomp.config import compose_config
from fedcomp.fl.engine import run_experiment
from fedcomp.fl.local import train_local
from fedcomp.fl.runtime import get_runtime

RESULTS = Path(__file__).parent / "results" / "overhead.json"


def overrides(num_clients: int, rounds: int, dataset: str, backend: str) -> list[str]:
    return [
        f"dataset={dataset}", "partition=iid", "model=mlp", "model.hidden=[64]",
        f"simulation.num_clients={num_clients}", f"num_rounds={rounds}", "train.steps=8",
        "train.batch_size=32", f"eval_every={10**6}", "progress=false", f"simulation.backend={backend}",
    ]


def timed(fn, repeat: int, device: torch.device = torch.device("cpu")) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls of ``fn`` (on a GPU: until the work it queued is done),
    and its last result."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_gflops(n: int = 1024, repeat: int = 10, device: torch.device = torch.device("cpu")) -> float:
    """The device's float32 matrix-product rate (on the CPU at torch's current thread count; on a
    GPU at n = 8192, which its rate needs, in full float32: PyTorch's default for matrix products,
    no TF32)."""
    n = 8192 if device.type == "cuda" else n
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: a @ b, repeat, device)
    return 2 * n**3 / seconds / 1e9


def plain_loop(cfg, rounds: int, per_round: int | None = None) -> list[float]:
    """Per-round seconds of the same federated work as plain PyTorch: every client each round,
    or ``per_round`` of them drawn at random."""
    rt = get_runtime(cfg)
    global_flat = rt.layout.flatten(rt.new_model())
    n = cfg.simulation.num_clients
    shards = [rt.client_indices(c) for c in range(n)]
    rng = torch.Generator().manual_seed(cfg.seed)
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        total, n_total = torch.zeros_like(global_flat), 0
        cohort = range(n) if per_round is None else torch.randperm(n, generator=rng)[:per_round].tolist()
        for c in cohort:
            indices = shards[c]
            rt.layout.load(rt.model, global_flat)
            train_local(rt.model, rt.train.x, rt.train.y, indices,
                        generator=torch.Generator().manual_seed(r * 100003 + c), **rt.local_training)
            total += len(indices) * (rt.layout.flatten(rt.model) - global_flat)
            n_total += len(indices)
        global_flat += total / n_total
        synchronize(global_flat.device)
        times.append(time.perf_counter() - start)
    return times


def fedcomp_rounds(cfg) -> tuple[list[float], float]:
    """Per-round seconds from the run's own metrics, and the whole call's seconds."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_experiment(cfg, out)
        total = time.perf_counter() - start
        wall = [json.loads(line)["wall_time_s"] for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0] + wall, wall)], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["inline", "ray"], choices=["inline", "ray"])
    ap.add_argument("--dataset", default="fmnist", help="fmnist (real) or synthetic")
    args = ap.parse_args()
    assert args.rounds >= 3, "need rounds 2..R-1"

    rows = []
    for n in args.clients:
        cfg = compose_config(overrides(n, args.rounds, args.dataset, "inline"))
        plain = statistics.median(plain_loop(cfg, args.rounds)[1:-1])
        row = {"clients": n, "plain_s": plain}
        for backend in args.backends:
            per_round, total = fedcomp_rounds(compose_config(overrides(n, args.rounds, args.dataset, backend)))
            steady = statistics.median(per_round[1:-1])
            row[f"{backend}_s"] = steady
            row[f"{backend}_ratio"] = steady / plain
            row[f"{backend}_startup_s"] = total - sum(per_round)
        rows.append(row)
        print(_format(row, args.backends), flush=True)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "setting": "MLP 784-64-10, 8 local steps x batch 32 per client, all clients every round",
        "dataset": args.dataset, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "rows": rows,
    }, indent=2))
    print(f"wrote {RESULTS}")


def _format(row: dict, backends: list[str]) -> str:
    parts = [f"clients {row['clients']:>4}", f"plain {row['plain_s'] * 1e3:8.1f} ms/round"]
    for b in backends:
        parts.append(f"{b} {row[f'{b}_s'] * 1e3:8.1f} ms/round ({row[f'{b}_ratio']:.2f}x, start-up {row[f'{b}_startup_s']:.1f} s)")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
