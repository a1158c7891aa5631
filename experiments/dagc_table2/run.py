"""DAGC Table II style comparison on FashionMNIST with cnn4, 10 clients.

Skew ratio {10, 100, 1000} (volume skew with Dirichlet(0.5) labels, Sec. V-A) x mean ratio
{10%, 1%, 0.1%}; DAGC (Algorithm 2 and the exact optimum) vs Top-delta (uniform) vs ACCORDION
(switching between the min and max of DAGC's ratios); top-k with error feedback, one local
step per round; accuracy after a fixed number of rounds, mean and spread over seeds.

    .venv/bin/python experiments/dagc_table2/run.py [--rounds 300] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedcomp.allocation import dagc_ratios
from fedcomp.partition import volume_skew_weights
from fedcomp.runs import run_once, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "dagc_table2"
RESULTS = Path(__file__).parent / "results"


def methods(skew: float, mean: float, seed: int) -> dict[str, list[str]]:
    deltas = dagc_ratios(volume_skew_weights(10, skew, seed), mean, "paper")
    return {
        "Top-delta": ["controller=uniform", f"controller.ratio={mean}"],
        "DAGC (paper)": ["controller=dagc", f"controller.mean_ratio={mean}", "controller.method=paper"],
        "DAGC (exact)": ["controller=dagc", f"controller.mean_ratio={mean}", "controller.method=exact"],
        "ACCORDION": ["controller=accordion", f"controller.low={deltas.min()}", f"controller.high={deltas.max()}"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skews", type=float, nargs="+", default=[10.0, 100.0, 1000.0])
    ap.add_argument("--steps", type=int, default=1, help="local SGD steps per round")
    args = ap.parse_args()
    lines = [f"# DAGC Table II style on FashionMNIST / cnn4 ({args.rounds} rounds x {args.steps} local steps, seeds {args.seeds})", "",
             f"Regenerate: `.venv/bin/python experiments/dagc_table2/run.py --rounds {args.rounds} --steps {args.steps}`", "",
             "| skew ratio | mean ratio | method | accuracy mean | accuracy std |", "|---|---|---|---|---|"]
    out = {}
    for skew in args.skews:
        for mean in (0.1, 0.01, 0.001):
            accs: dict[str, list[float]] = {}
            for seed in args.seeds:
                for name, ov in methods(skew, mean, seed).items():
                    base = ["dataset=fmnist", "model=cnn4", "simulation.num_clients=10", "partition=volume_skew",
                            f"partition.skew_ratio={skew}", "partition.label_alpha=0.5", "compressor=topk",
                            f"num_rounds={args.rounds}", f"train.steps={args.steps}", f"eval_every={args.rounds}", f"seed={seed}"]
                    run = RUNS / f"r{args.rounds}x{args.steps}_sr{skew:g}_d{mean:g}_s{seed}_{name.replace(' ', '_').replace('(', '').replace(')', '')}"
                    accs.setdefault(name, []).append(run_once(run, base + ov, run.name)["final_accuracy"])
            for name, a in accs.items():
                out[f"sr{skew:g}/d{mean:g}/{name}"] = a
                lines.append(f"| {skew:g} | {mean:g} | {name} | {np.mean(a):.4f} | {np.std(a):.4f} |")
    write_results(RESULTS, lines, out)


if __name__ == "__main__":
    main()
