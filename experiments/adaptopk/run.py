"""AdapTop-K (002_...) vs fixed Top-K on FashionMNIST with logistic regression.

10 clients with Dirichlet(0.5) labels, one local SGD step per round, compression d/k in
{128, 256}, with error compensation (Algorithm 2, error feedback) and without (Algorithm 1).
AdapTop-K uses gamma = 0.5 and t_hat = T/2 (set directly: Lemma 3 / 8 need the problem's
alpha and beta). The budgets are compared from the bytes actually sent.

    .venv/bin/python experiments/adaptopk/run.py [--rounds 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcomp.runs import run_once, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "adaptopk"
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    base = ["dataset=fmnist", "model=logreg", "partition=dirichlet", "simulation.num_clients=10", f"num_rounds={args.rounds}",
            "train.steps=1", "train.batch_size=64", "train.lr=0.1", f"eval_every={max(1, args.rounds // 40)}", "compressor=topk"]
    lines = [f"# AdapTop-K vs Top-K on FashionMNIST / logreg ({args.rounds} rounds, 10 clients, Dirichlet 0.5)", "",
             f"Regenerate: `.venv/bin/python experiments/adaptopk/run.py --rounds {args.rounds}`", "",
             "| d/k | error feedback | method | final acc | best acc | final loss | uplink MB |", "|---|---|---|---|---|---|---|"]
    out = {}
    for dk in (128, 256):
        for ef in (True, False):
            for method, ov in (("Top-K", ["controller=uniform", f"controller.ratio={1 / dk}"]),
                               ("AdapTop-K", ["controller=adaptopk", f"controller.ratio={1 / dk}", "controller.gamma=0.5"])):
                name = f"dk{dk}_{'ef' if ef else 'noef'}_{method}"
                s = run_once(RUNS / name, base + ov + [f"compressor.up.error_feedback={str(ef).lower()}"], name)
                loss = [r["loss"] for r in s["rows"] if r["loss"] is not None][-1]
                out[name] = {"final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"], "final_loss": loss, "bytes_up": s["total_bytes_up"]}
                lines.append(f"| {dk} | {'yes' if ef else 'no'} | {method} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | {loss:.4f} | {s['total_bytes_up'] / 1e6:.3f} |")
    write_results(RESULTS, lines, out)


if __name__ == "__main__":
    main()
