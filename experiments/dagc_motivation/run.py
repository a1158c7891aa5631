"""DAGC Sec. III motivating example on FashionMNIST with logistic regression.

11 workers, one with 50% of the data and ten with 5% (IID labels), D-EF-SGD (one local SGD
step per round, top-k with error feedback), the same total budget sum_i delta_i = 11 x 0.1%:
  uniform         every worker 0.1%
  non-uniform I   the large worker 1%, the small ones 0.01% (more to the large worker)
  non-uniform II  the large worker 0.01%, the small ones 0.109%
plus DAGC's allocation (Algorithm 2, and the exact optimum) at mean 0.1%. Reports the
rounds (= iterations) to reach 80% test accuracy and the uplink bytes spent until then.

    .venv/bin/python experiments/dagc_motivation/run.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcomp.runs import first_round, run_once, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "dagc_motivation"
RESULTS = Path(__file__).parent / "results"

SCHEMES = {
    "uniform": ["controller=uniform", "controller.ratio=0.001"],
    "non-uniform I": ["controller=nonuniform", "controller.per_client=[0.01," + ",".join(["0.0001"] * 10) + "]"],
    "non-uniform II": ["controller=nonuniform", "controller.per_client=[0.0001," + ",".join(["0.00109"] * 10) + "]"],
    "DAGC (paper)": ["controller=dagc", "controller.mean_ratio=0.001", "controller.method=paper"],
    "DAGC (exact)": ["controller=dagc", "controller.mean_ratio=0.001", "controller.method=exact"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = ["dataset=fmnist", "model=logreg", "partition=explicit", "simulation.num_clients=11",
            "compressor=topk", f"num_rounds={args.rounds}", "train.steps=1", "train.batch_size=32",
            "train.lr=0.05", f"eval_every={max(1, args.rounds // 100)}", f"seed={args.seed}"]
    lines = [f"# DAGC Sec. III on FashionMNIST / logreg ({args.rounds} rounds, seed {args.seed})", "",
             f"Regenerate: `.venv/bin/python experiments/dagc_motivation/run.py --rounds {args.rounds}`", "",
             "| scheme | rounds to 80% | uplink MB to 80% | final acc | best acc | total uplink MB |", "|---|---|---|---|---|---|"]
    out = {}
    for name, ov in SCHEMES.items():
        s = run_once(RUNS / name.replace(" ", "_").replace("(", "").replace(")", ""), base + ov, name)
        hit = first_round(s["rows"], "accuracy", lambda a: a >= 0.8)
        out[name] = {"to_80": hit, "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"], "total_bytes_up": s["total_bytes_up"]}
        lines.append(f"| {name} | {hit['round'] if hit else 'not reached'} | {hit['bytes_up'] / 1e6:.3f} |" if hit else f"| {name} | not reached | - |")
        lines[-1] += f" {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | {s['total_bytes_up'] / 1e6:.3f} |"
    write_results(RESULTS, lines, out)


if __name__ == "__main__":
    main()
