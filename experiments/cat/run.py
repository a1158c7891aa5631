"""CAT (001_... Fig. 1c / 2) on FashionMNIST with logistic regression: bits to a target loss,
fixed T against CAT, for sparsification, sparsification + quantization (S+Q) and stochastic
sparsification.

4 clients with IID data, one local SGD step of batch 256 per round (compressed gradient
descent, lr 0.1 as the base step 1/L), no error feedback (the paper's CAT has none). Every run
uses the same compressor (``compressor=cat``) and the step of its descent lemma (Lemma 1, 3
or 4): the fixed-T runs set ``budget=T`` and skip the search, so only the tuning rule differs.
CAT runs under the payload model and under the paper's packet model (Fig. 1c: c1 = 128 B per
packet, c0 = 64 B, P_max = 128 B, FPP = 64). For each run: the uplink payload bits (actual
encoded bytes) and the packet-model cost of those payloads, spent until the test loss first
reaches the target.

    .venv/bin/python experiments/cat/run.py [--rounds 2000] [--target-loss 0.6] [--eval-every 10] [--jobs 2]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedcomp.runs import first_round, run_many, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "cat"
RESULTS = Path(__file__).parent / "results"
C0_BITS, C1_BITS, P_MAX_BITS, FPP = 64 * 8, 128 * 8, 128 * 8, 64  # the paper's packet model (Fig. 1c)
KINDS = ("sparsification", "sq", "stochastic")
FIXED_T = (1, 10, 100, 1000)


def packet_cost_bits(rows, until_round: int) -> int:
    """The packet model (Eq. 6) applied to every client message actually sent:
    c1 x ceil(payload bits / P_max) + c0."""
    return sum(C1_BITS * math.ceil(8 * c["bytes_up"] / P_MAX_BITS) + C0_BITS
               for r in rows if r["round"] <= until_round for c in r["clients"].values())


def runs(rounds: int) -> dict[str, list[str]]:
    packet = ["compressor.up.cost=packet", f"compressor.up.c0={C0_BITS}", f"compressor.up.c1={C1_BITS}",
              f"compressor.up.packet_bits={P_MAX_BITS}"]
    out = {}
    for kind in KINDS:
        base = ["compressor=cat", f"compressor.up.kind={kind}", f"compressor.up.fpp={FPP}"]
        for t in FIXED_T:
            out[f"{kind} | fixed T={t}"] = [*base, *packet, f"compressor.up.budget={t}"]
        out[f"{kind} | CAT, payload model"] = [*base, "compressor.up.cost=payload"]
        out[f"{kind} | CAT, packet model"] = [*base, *packet]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--target-loss", type=float, default=0.6)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=10, help="test loss every N rounds: the grid 'rounds to target' is read on")
    args = ap.parse_args()
    base = ["dataset=fmnist", "model=logreg", "partition=iid", "simulation.num_clients=4", f"num_rounds={args.rounds}",
            "train.steps=1", "train.batch_size=256", "train.lr=0.1", f"eval_every={args.eval_every}"]
    table = runs(args.rounds)
    dirs = {name: RUNS / f"r{args.rounds}e{args.eval_every}_{''.join(ch if ch.isalnum() else '_' for ch in name)}" for name in table}
    summaries = dict(zip(table, run_many([(dirs[n], base + ov) for n, ov in table.items()], jobs=args.jobs)))
    lines = [f"# CAT vs fixed T on FashionMNIST / logreg (4 clients, target test loss {args.target_loss})", "",
             f"Regenerate: `.venv/bin/python experiments/cat/run.py --rounds {args.rounds} --target-loss {args.target_loss} "
             f"--eval-every {args.eval_every}`", "",
             "Every run: one SGD step of batch 256 per round, lr 0.1, no error feedback, the same CAT compressor and lemma "
             "step (fixed T: the search switched off). Packet model: c1 = 128 B per packet, c0 = 64 B, P_max = 128 B, "
             "FPP = 64 (the paper's Fig. 1c), applied to the actual encoded payloads. Test loss every "
             f"{args.eval_every} rounds: 'rounds to target' is the first evaluation at or below the target. CPU, 1 seed.", "",
             "| compressor | T | rounds to target | payload Mbit to target | packet-model Mbit to target | mean payload per message | final loss | final acc |",
             "|---|---|---|---|---|---|---|---|"]
    out = {}
    for name, s in summaries.items():
        kind, rule = name.split(" | ")
        hit = first_round(s["rows"], "loss", lambda v: v <= args.target_loss)
        final_loss = [r["loss"] for r in s["rows"] if r["loss"] is not None][-1]
        messages = [c for r in s["rows"] for c in r["clients"].values()]
        mean_bytes = sum(c["bytes_up"] for c in messages) / len(messages)
        packets = packet_cost_bits(s["rows"], hit["round"]) if hit else None
        cells = (f"{hit['round']} | {8 * hit['bytes_up'] / 1e6:.3f} | {packets / 1e6:.3f}" if hit else "not reached | - | -")
        lines.append(f"| {kind} | {rule} | {cells} | {mean_bytes:,.0f} B | {final_loss:.4f} | {s['final_accuracy']:.4f} |")
        out[name] = {"to_target": hit, "packet_bits_to_target": packets, "mean_payload_bytes": mean_bytes,
                     "final_loss": final_loss, "final_accuracy": s["final_accuracy"]}
    write_results(RESULTS, lines, out)


if __name__ == "__main__":
    main()
