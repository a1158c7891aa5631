"""Reproduce HGC's Table 2-4 comparison on FashionMNIST with cnn4 (003_... Sec. 5).

    .venv/bin/python experiments/hgc_table2/run.py [--rounds 120] [--only 4iid|10dir]

Settings: 4 clients with IID data (the paper's client count) and 10 clients with
Dirichlet(0.5) labels. Methods: FedAvg, DGC, EF-signSGD, STC, HGC at sparsity 0.1% and 1-bit
quantization; HGC also at (1%, 1 bit) and (0.1%, 2 bits), and, for Table 3, with the
temporal (prediction) and cross-client (shared mask) mechanisms switched off. Every run uses
the same local training (5 SGD steps of batch 32 per round, lr 0.05 divided by 10 at 50% and
75% of the rounds), the 1000 Mbit/s network model, and a sparsification warm-up over the
first 10% of rounds for every sparsifier, as the paper does.

Each run is a `fedcomp` command; runs whose summary.json exists are not repeated. Results:
results/table2.md (Tables 2-4), results/summary.json, results/accuracy_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedcomp.metrics.accounting import speedup
from fedcomp.network import ClientLink, shared_mask_round_time
from fedcomp.runs import run_once, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "hgc_table2"
RESULTS = Path(__file__).parent / "results"

SETTINGS = {
    "4iid": ["simulation.num_clients=4", "partition=iid"],
    "10dir": ["simulation.num_clients=10", "partition=dirichlet", "partition.alpha=0.5"],
}


def methods(rounds: int) -> dict[str, list[str]]:
    warm = max(1, rounds // 10)
    hgc = lambda ratio, bits, *extra: ["strategy=hgc", f"strategy.ratio={ratio}", f"strategy.bits={bits}", f"strategy.warmup_rounds={warm}", *extra]
    return {
        "FedAvg": ["compressor=none"],
        "DGC": ["compressor=dgc", "compressor.up.ratio=0.001", f"compressor.up.warmup_rounds={warm}"],
        "EF-signSGD": ["compressor=scaled_sign"],
        "STC": ["compressor=stc", "compressor.up.ratio=0.001", "compressor.down.ratio=0.001"],
        "HGC": hgc(0.001, 1),
        "HGC (1%, 1 bit)": hgc(0.01, 1),
        "HGC (0.1%, 2 bits)": hgc(0.001, 2),
        # Investigation (4 clients only): DGC's momentum correction gives it momentum that the
        # other methods lack; HGC with server momentum isolates that effect.
        "HGC + momentum 0.9": hgc(0.001, 1, "strategy.momentum=0.9"),
    }


def ablations(rounds: int, variants: tuple[str, ...]) -> dict[str, list[str]]:
    """For Table 3: HGC variants without prediction, and without prediction or shared mask."""
    out = {}
    for name, ov in methods(rounds).items():
        if name in variants:
            out[f"{name} | no prediction"] = [*ov, "strategy.predictive=false"]
            out[f"{name} | no prediction, own masks"] = [*ov, "strategy.predictive=false", "strategy.mask_policy=own"]
    return out


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def run(setting: str, name: str, overrides: list[str], rounds: int) -> dict:
    return run_once(RUNS / setting / slug(name), [
        "dataset=fmnist", "model=cnn4", "network=lan_1gbps", f"num_rounds={rounds}", "train.steps=5",
        "train.batch_size=32", "train.lr=0.05", "train.lr_milestones=[0.5,0.75]", f"eval_every={max(1, rounds // 10)}",
        *SETTINGS[setting], *overrides,
    ], f"[{setting}] {name}")


LINK = ClientLink(1e9, 1e9, 0.5e-3)  # network=lan_1gbps


def fixed_compute_time(s: dict, compute_s: float) -> float:
    """Simulated time of a run with every client's local compute set to ``compute_s``, so the
    speedup compares communication alone and is immune to machine load while the runs were
    measured. Same round-time model as the strategies (fedcomp.network): a synchronous round
    lasts as long as its slowest client; under HGC's shared mask the members compress only
    after the owner (the client carrying the mask: the largest upload) is done."""
    two_phase = s["config"]["strategy"]["_target_"].endswith("HGCStrategy") and s["config"]["strategy"]["mask_policy"] != "own"
    total = 0.0
    for r in s["rows"]:
        parties = [(LINK, c["bytes_up"], c["bytes_down"], compute_s) for c in r["clients"].values()]
        if not two_phase or len(parties) == 1:
            total += max(link.round_time(up, down, t) for link, up, down, t in parties)
            continue
        owner = max(parties, key=lambda p: p[1])
        members = [p for p in parties if p is not owner]
        # Members' downlink carries the relayed mask on top of what the owner received.
        mask = max(0, max(p[2] for p in members) - owner[2])
        total += shared_mask_round_time(owner, members, mask)
    return total


def fmt(x: float) -> str:
    return f"{x:,.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=120)
    ap.add_argument("--only", choices=sorted(SETTINGS))
    ap.add_argument("--table3", nargs="+", default=["HGC"], help="HGC variants to decompose (each costs two more runs)")
    args = ap.parse_args()
    settings = [args.only] if args.only else list(SETTINGS)

    results: dict[str, dict[str, dict]] = {}
    for setting in settings:
        runs = methods(args.rounds) if setting == "4iid" else {k: v for k, v in methods(args.rounds).items() if "(" not in k and "+" not in k}
        if setting == "4iid":
            runs |= ablations(args.rounds, tuple(args.table3))
        results[setting] = {name: run(setting, name, ov, args.rounds) for name, ov in runs.items()}

    lines = [f"# HGC Table 2-4 on FashionMNIST / cnn4 ({args.rounds} rounds)", "",
             "Regenerate: `.venv/bin/python experiments/hgc_table2/run.py" + (f" --rounds {args.rounds}" if args.rounds != 120 else "") + "`", ""]
    for setting, runs in results.items():
        fedavg = runs["FedAvg"]
        # Reference compute: the median client round of the FedAvg run of this setting.
        compute_ref = float(np.median([c["compute_s"] for r in fedavg["rows"] for c in r["clients"].values()]))
        for s in runs.values():
            s["fixed_time_s"] = fixed_compute_time(s, compute_ref)
        lines += [f"## Table 2: {setting} ({'4 clients, IID' if setting == '4iid' else '10 clients, Dirichlet(0.5)'})", "",
                  f"Speedup: FedAvg's simulated time over the method's for the same {args.rounds} rounds at 1000 Mbit/s, with every "
                  f"client's compute fixed at FedAvg's median measured client round ({compute_ref * 1e3:.0f} ms).", "",
                  "| method | Max CR up | Max CR down | Max CR total | Total CR up | Total CR down | Total CR total | speedup (1 Gbit/s) | final acc | best acc |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in runs.items():
            if "|" in name:
                continue
            m, t = s["max_cr"], s["total_cr"]
            lines.append(f"| {name} | {fmt(m['up'])} | {fmt(m['down'])} | {fmt(m['total'])} | {fmt(t['up'])} | {fmt(t['down'])} | "
                         f"{fmt(t['total'])} | {speedup(fedavg['fixed_time_s'], s['fixed_time_s']):.2f} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} |")
        lines.append("")
        if setting == "4iid":
            lines += ["## Table 3: decomposition of HGC's Max CR up = CR_i x CR_c x CR_t (4 clients, IID)", "",
                      "CR_i = Max CR up with own masks and no prediction; CR_c = (shared mask, no prediction) / (own masks, no prediction); "
                      "CR_t = (shared mask, prediction) / (shared mask, no prediction). Each factor is measured by switching its mechanism off in an otherwise identical run.", "",
                      "| (k/d, q) | CR_i | CR_c | CR_t | Max CR up | accuracy (full HGC) |", "|---|---|---|---|---|---|"]
            for name, label in (("HGC", "0.001, 1"), ("HGC (1%, 1 bit)", "0.01, 1"), ("HGC (0.1%, 2 bits)", "0.001, 2")):
                if f"{name} | no prediction" not in runs:
                    continue
                full = runs[name]["max_cr"]["up"]
                nopred = runs[f"{name} | no prediction"]["max_cr"]["up"]
                own = runs[f"{name} | no prediction, own masks"]["max_cr"]["up"]
                lines.append(f"| {label} | {fmt(own)} | {fmt(nopred / own)} | {fmt(full / nopred)} | {fmt(full)} | {runs[name]['final_accuracy']:.4f} |")
            lines += ["", "## Table 4: HGC variants over the whole run (4 clients, IID)", "",
                      "| (k/d, q) | Total CR up | speedup | accuracy |", "|---|---|---|---|"]
            for name, label in (("HGC", "0.001, 1"), ("HGC (1%, 1 bit)", "0.01, 1"), ("HGC (0.1%, 2 bits)", "0.001, 2")):
                s = runs[name]
                lines.append(f"| {label} | {fmt(s['total_cr']['up'])} | {speedup(fedavg['fixed_time_s'], s['fixed_time_s']):.2f} | {s['final_accuracy']:.4f} |")
            lines.append("")
    write_results(RESULTS, lines, {
        setting: {name: {k: s[k] for k in ("max_cr", "total_cr", "final_accuracy", "best_accuracy", "fixed_time_s", "total_bytes_up", "total_bytes_down")}
                  for name, s in runs.items()} for setting, runs in results.items()}, table="table2.md")
    plot(results)


def plot(results: dict[str, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (setting, runs) in zip(axes[0], results.items()):
        for name, s in runs.items():
            if "|" in name:
                continue
            total, xs, ys = 0, [], []
            for r in s["rows"]:
                total += r["bytes_up"] + r["bytes_down"]
                if r["accuracy"] is not None:
                    xs.append(total / 1e6)
                    ys.append(r["accuracy"])
            ax.plot(xs, ys, marker=".", label=name)
        ax.set(xscale="log", xlabel="total bytes moved, up + down (MB, log)", ylabel="test accuracy", title=setting)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_vs_bytes.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
