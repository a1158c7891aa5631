"""Layer-wise vs entire-model compression (Dutta et al., 004_..., Algorithm 1 and Sec. 5).

Each compressor runs twice: on the whole model update as one vector (``scope=model``) and on
each parameter tensor on its own with its own instance (``scope=layerwise``: one scale, one
threshold, one k per layer). Algorithm 1 setting: compression every iteration (one local SGD
step per round), no error feedback, the master averages the decompressed updates and every
worker applies the result (dense fp32 downlink). Compressors as the paper benchmarks them:
Random-k and Top-k (k = 1% of the segment; Top-k also at 0.1%, the small-ratio case where the
paper saw layer-wise lose), Threshold-v, TernGrad, Adaptive Threshold with one threshold per
segment (|2 g_j| >= max |g|, the authors' reference code: ``bin_size=null residue=false``)
and QSGD with s = 256. FedAvg (fp32) is the uncompressed reference.

Recipe, shared by every run: FashionMNIST, 4 IID clients, one SGD step of batch 64 per round,
lr 0.1 divided by 10 at 50% and 75% of the rounds, no momentum (Algorithm 1's update
x <- x - eta g~). The models have no buffers, so segments are exactly the parameter tensors.

    .venv/bin/python experiments/layerwise_vs_model/run.py [--model mlp] [--rounds 2000] [--jobs 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcomp.runs import run_many, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "layerwise_vs_model"
RESULTS = Path(__file__).parent / "results"
# Threshold-v: about 2% (mlp) / 4% (cnn4) of the first update's coordinates reach v.
THRESHOLD_V = {"mlp": 6e-4, "cnn4": 2e-4}


def compressors(model: str) -> dict[str, list[str]]:
    return {
        "Random-k 1%": ["compressor=randomk", "compressor.up.ratio=0.01"],
        "Top-k 1%": ["compressor=topk", "compressor.up.ratio=0.01"],
        "Top-k 0.1%": ["compressor=topk", "compressor.up.ratio=0.001"],
        f"Threshold-v (v={THRESHOLD_V[model]:g})": ["compressor=threshold", f"compressor.up.v={THRESHOLD_V[model]}"],
        "TernGrad": ["compressor=terngrad"],
        "Adaptive Threshold": ["compressor=adaptive_threshold", "compressor.up.bin_size=null", "compressor.up.residue=false"],
        "QSGD (s=256)": ["compressor=qsgd", "compressor.up.levels=256"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(THRESHOLD_V), default="mlp")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    base = ["dataset=fmnist", f"model={args.model}", "partition=iid", "simulation.num_clients=4", f"num_rounds={args.rounds}",
            "train.steps=1", "train.batch_size=64", "train.lr=0.1", "train.lr_milestones=[0.5,0.75]", f"eval_every={max(1, args.rounds // 20)}"]
    cells = {("FedAvg (fp32)", "-"): ["compressor=none"]}
    for name, ov in compressors(args.model).items():
        for scope in ("model", "layerwise"):
            cells[name, scope] = [*ov, f"compressor.up.scope={scope}", "compressor.up.error_feedback=false"]
    dirs = {cell: RUNS / args.model / f"r{args.rounds}" / "".join(ch if ch.isalnum() else "_" for ch in f"{cell[0]}_{cell[1]}") for cell in cells}
    summaries = dict(zip(cells, run_many([(dirs[c], base + ov) for c, ov in cells.items()], jobs=args.jobs)))
    lines = [f"# Layer-wise vs entire-model compression on FashionMNIST / {args.model} ({args.rounds} rounds)", "",
             f"Regenerate: `.venv/bin/python experiments/layerwise_vs_model/run.py --model {args.model} --rounds {args.rounds}`", "",
             "Every run: 4 IID clients, 1 SGD step of batch 64 per round, lr 0.1 (x0.1 at 50% and 75%), no momentum, "
             "no error feedback, dense fp32 downlink; CPU, 1 seed. Uplink bytes are the encoded payloads.", "",
             "| compressor | scope | final acc | best acc | uplink MB | Total CR up | layer-wise - entire model (points) |",
             "|---|---|---|---|---|---|---|"]
    out = {}
    for (name, scope), s in summaries.items():
        other = summaries.get((name, "model")) if scope == "layerwise" else None
        diff = f"{100 * (s['final_accuracy'] - other['final_accuracy']):+.2f}" if other else ""
        lines.append(f"| {name} | {scope} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | "
                     f"{s['total_bytes_up'] / 1e6:,.2f} | {s['total_cr']['up']:,.1f} | {diff} |")
        out[f"{name} | {scope}"] = {k: s[k] for k in ("final_accuracy", "best_accuracy", "total_bytes_up", "total_cr")}
    write_results(RESULTS / args.model, lines, out)


if __name__ == "__main__":
    main()
