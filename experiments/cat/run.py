"""CAT (001_... Fig. 1c / 2 style) on FashionMNIST with logistic regression.

4 clients with IID data, one local SGD step per round (compressed gradient descent), top-k
with error feedback at fixed T in {1, 10, 100, 1000} coordinates against CAT, which picks T
every round for each client under the payload model and under the packet model (1472-byte
UDP payloads with 54 bytes of headers, as in the paper's example). For each run: the
uplink payload bits, and the packet-model cost (packets, each payload plus headers), spent
until the test loss first reaches the target.

    .venv/bin/python experiments/cat/run.py [--rounds 600] [--target-loss 0.6]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedcomp.runs import first_round, run_once, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "cat"
RESULTS = Path(__file__).parent / "results"
PACKET_BITS, OVERHEAD_BITS = 1472 * 8, 54 * 8


def packet_cost_bits(rows, until_round: int) -> int:
    """Bits on the wire under the packet model: each client message is ceil(bits / 1472 B)
    packets of payload plus 54 B of headers."""
    total = 0
    for r in rows:
        if r["round"] > until_round:
            break
        for c in r["clients"].values():
            total += math.ceil(8 * c["bytes_up"] / PACKET_BITS) * (PACKET_BITS + OVERHEAD_BITS)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--target-loss", type=float, default=0.6)
    args = ap.parse_args()
    base = ["dataset=fmnist", "model=logreg", "partition=iid", "simulation.num_clients=4", f"num_rounds={args.rounds}",
            "train.steps=1", "train.batch_size=256", "train.lr=0.1", f"eval_every={max(1, args.rounds // 60)}"]
    runs = {f"top-k, T={t}": ["compressor=topk", "~compressor.up.ratio", f"+compressor.up.k={t}"] for t in (1, 10, 100, 1000)}
    runs["CAT, payload model"] = ["compressor=cat", "compressor.up.cost=payload"]
    runs["CAT, packet model"] = ["compressor=cat", "compressor.up.cost=packet",
                                 "compressor.up.uplink_mbps=null", "compressor.up.latency_ms=null"]
    lines = [f"# CAT vs fixed T on FashionMNIST / logreg (4 clients, target test loss {args.target_loss})", "",
             f"Regenerate: `.venv/bin/python experiments/cat/run.py --rounds {args.rounds} --target-loss {args.target_loss}`", "",
             "| method | rounds to target | payload Mbit to target | packet-model Mbit to target | final loss | final acc |", "|---|---|---|---|---|---|"]
    out = {}
    for name, ov in runs.items():
        s = run_once(RUNS / "".join(ch if ch.isalnum() else "_" for ch in name), base + ov, name)
        hit = first_round(s["rows"], "loss", lambda v: v <= args.target_loss)
        final_loss = [r["loss"] for r in s["rows"] if r["loss"] is not None][-1]
        if hit:
            pk = packet_cost_bits(s["rows"], hit["round"])
            lines.append(f"| {name} | {hit['round']} | {8 * hit['bytes_up'] / 1e6:.3f} | {pk / 1e6:.3f} | {final_loss:.4f} | {s['final_accuracy']:.4f} |")
        else:
            pk = None
            lines.append(f"| {name} | not reached | - | - | {final_loss:.4f} | {s['final_accuracy']:.4f} |")
        out[name] = {"to_target": hit, "packet_bits_to_target": pk, "final_loss": final_loss, "final_accuracy": s["final_accuracy"]}
    write_results(RESULTS, lines, out)


if __name__ == "__main__":
    main()
