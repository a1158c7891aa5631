"""Reproduce HGC's Tables 2-4 on FashionMNIST with cnn4 (003_... Sec. 5), on one recipe for all.

    .venv/bin/python experiments/hgc_table2/run.py [--rounds 3000] [--seeds 0 1 2] [--only 4iid|10dir]
        [--methods FedAvg HGC] [--jobs 2] [--table-only]

Recipe, shared by every method (the paper's FedAvg baseline as its reference code, SOFF, runs
it): one local SGD step of batch 32 per round, lr 0.05 divided by 10 at 50% and 75% of the
rounds, weight decay 1e-3, and each client's optimizer kept across rounds
(``train.optimizer_state=persistent``) with its momentum ramped 0 -> 0.3 -> 0.6 -> 0.9 at 30%,
50% and 70% of the rounds (SOFF's epochs 60 / 100 / 140 of 200). An earlier ramp (5 / 10 / 15%)
made HGC's shared 0.1% mask diverge once momentum 0.9 met the undecayed lr (see results/). DGC's momentum correction takes that same momentum
(``compressor.up.momentum=null``; the client's optimizer then runs without it). Every
sparsifier warms up from 25% to its ratio over the paper's 300 rounds.

Settings: 4 clients with IID data (the paper's client count) and 10 clients with
Dirichlet(0.5) labels. Methods: FedAvg, DGC, EF-signSGD, STC (0.1%, both ways), HGC at 0.1%
and 1 bit with Sec. 3.2's window (ratio 1% for 1% of the rounds either side of each LR step,
then error feedback and momentum cleared), with that window 10% of the rounds either side
(SOFF's default: ``--ugc.correction-epochs 20`` of 200 epochs), and with DGC's momentum factor
masking added (``strategy.momentum_masking``; not in the paper or SOFF: it tests whether
momentum pushed again through error feedback opens HGC's gap). On 4 IID clients also HGC at
(1%, 1 bit), (0.1%, 2 bits), with the paper's fp32 downlink, with SOFF's window and its
per-tensor masks and levels (``strategy.scope=layerwise``, ``soff/algorithms/ugc/utils.py``; no
exempt tensors, as for SOFF's 4-layer FEMNIST CNN), and, for Table 3 (first seed), with the
temporal (prediction) and cross-client (shared mask) mechanisms switched off.

Each run is a `fedcomp` command; a finished run is kept as a record in results/runs/ (summary
and per-round bytes and accuracy, gzipped JSON) and never repeated, so more seeds or settings
can be added later. Results: results/table2.md, results/summary.json, results/accuracy.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedcomp.metrics.accounting import speedup
from fedcomp.runs import finished, mean_std, plateau_round, run_many, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "hgc_table2"
RESULTS = Path(__file__).parent / "results"
PAPER_WARMUP = 300  # rounds of sparsification-ratio warm-up (003_... Sec. 5)
RAMP = ((0.3, 0.3), (0.5, 0.6), (0.7, 0.9))  # (fraction of rounds, local momentum): SOFF's 60/100/140 of 200 epochs
RECIPE = "sofframp"  # run-directory tag: runs of another recipe are never mixed in

SETTINGS = {
    "4iid": ["simulation.num_clients=4", "partition=iid"],
    "10dir": ["simulation.num_clients=10", "partition=dirichlet", "partition.alpha=0.5"],
}
MAIN = ("HGC", "FedAvg", "DGC", "EF-signSGD", "STC")  # in both settings
CLAIM = ("HGC", "FedAvg", "HGC (SOFF window)", "HGC + momentum masking")  # the comparisons the paper's claim is about: every seed (others: the first)
EXTRA = ("HGC (1%, 1 bit)", "HGC (0.1%, 2 bits)", "HGC (paper downlink)", "HGC (SOFF window, per tensor)")  # 4 IID clients only
ABLATIONS = ("HGC | no prediction", "HGC | no prediction, own masks")  # Table 3, first seed, 4 IID
VARIANTS = ("HGC (SOFF window)", "HGC + momentum masking")  # HGC variants in both settings, on the claim's seeds


def recipe(rounds: int) -> list[str]:
    ramp = [[round(f * rounds), m] for f, m in RAMP]
    return [
        "dataset=fmnist", "model=cnn4", "network=lan_1gbps", f"num_rounds={rounds}", "train.steps=1", "train.batch_size=32",
        "train.lr=0.05", "train.weight_decay=0.001", "train.optimizer_state=persistent", "train.momentum=0.0",
        f"train.momentum_ramp={ramp}".replace(" ", ""), "train.lr_milestones=[0.5,0.75]", f"eval_every={max(1, rounds // 20)}",
    ]


def methods(rounds: int) -> dict[str, list[str]]:
    warm = min(PAPER_WARMUP, rounds // 10)

    def hgc(ratio: float, bits: int, *extra: str, window: int = max(1, rounds // 100)) -> list[str]:
        return ["strategy=hgc", f"strategy.ratio={ratio}", f"strategy.bits={bits}", f"strategy.warmup_rounds={warm}",
                f"strategy.lr_step_window={window}", "strategy.lr_step_ratio=0.01", *extra]

    return {
        "FedAvg": ["compressor=none"],
        "DGC": ["compressor=dgc", "compressor.up.ratio=0.001", "compressor.up.momentum=null", f"compressor.up.warmup_rounds={warm}"],
        "EF-signSGD": ["compressor=scaled_sign", "compressor.up.error_feedback=true"],
        "STC": ["compressor=stc", "compressor.up.ratio=0.001", "compressor.down.ratio=0.001"],
        "HGC": hgc(0.001, 1),
        "HGC (1%, 1 bit)": hgc(0.01, 1),
        "HGC (0.1%, 2 bits)": hgc(0.001, 2),
        "HGC (paper downlink)": hgc(0.001, 1, "strategy.broadcast=paper"),
        "HGC (SOFF window)": hgc(0.001, 1, window=rounds // 10),
        "HGC (SOFF window, per tensor)": hgc(0.001, 1, "strategy.scope=layerwise", window=rounds // 10),
        "HGC + momentum masking": hgc(0.001, 1, "strategy.momentum_masking=true"),
        "HGC | no prediction": hgc(0.001, 1, "strategy.predictive=false"),
        "HGC | no prediction, own masks": hgc(0.001, 1, "strategy.predictive=false", "strategy.mask_policy=own"),
    }


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def plan(rounds: int, seeds: list[int], settings: list[str], every_seed: bool = False) -> list[tuple[str, str, int, Path, list[str], Path]]:
    """(setting, method, seed, out_dir, overrides, record), most informative first: every method of the
    first seed before any second seed; later seeds only for the claim's methods (FedAvg, the HGC windows) unless
    ``every_seed``."""
    table = methods(rounds)
    out = []
    for seed in seeds:
        for setting in settings:
            if seed != seeds[0] and not every_seed:
                names = CLAIM
            else:
                names = MAIN + (EXTRA + (ABLATIONS if seed == seeds[0] else ()) if setting == "4iid" else ())
                names += VARIANTS
            for name in names:
                where = Path(f"r{rounds}_{RECIPE}") / setting / f"s{seed}" / slug(name)
                out.append((setting, name, seed, RUNS / where, [*recipe(rounds), *SETTINGS[setting], *table[name], f"seed={seed}"],
                            RESULTS / "runs" / where.with_suffix(".json.gz")))
    return out


def ratios_without_first_sync(s: dict) -> dict[str, float]:
    """Total CR down and total with round 1's downlink (the initial model sync) left out of
    both the method's bytes and the dense reference."""
    clients = [c for r in s["rows"] for c in r["clients"].values()]
    later = [c for r in s["rows"] if r["round"] > 1 for c in r["clients"].values()]
    dense = s["dense_payload_bytes"]
    up, down = sum(c["bytes_up"] for c in clients), sum(c["bytes_down"] for c in later)
    return {"down": dense * len(later) / down, "total": dense * (len(clients) + len(later)) / (up + down)}


def fmt(x: float) -> str:
    return f"{x:,.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=sorted(SETTINGS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--table-only", action="store_true", help="tabulate the finished runs, run nothing")
    ap.add_argument("--every-seed", action="store_true", help="every method on every seed (default: FedAvg and the HGC windows)")
    ap.add_argument("--methods", nargs="+", metavar="NAME", help="run only these methods of the plan (e.g. FedAvg HGC)")
    args = ap.parse_args()
    settings = [args.only] if args.only else list(SETTINGS)
    todo = plan(args.rounds, args.seeds, settings, args.every_seed)
    if args.methods:
        unknown = set(args.methods) - set(methods(args.rounds))
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; known: {sorted(methods(args.rounds))}")
        todo = [c for c in todo if c[1] in args.methods]
    if not args.table_only:
        run_many([(out, ov, record) for *_, out, ov, record in todo], jobs=args.jobs)
    # The table covers every finished run of this round count (recorded, or in outputs/ and
    # recorded now), whatever this call ran; the default plan's other cells are listed as not run.
    seeds = sorted({0, 1, 2, *args.seeds})
    cells = [c for c in plan(args.rounds, seeds, list(SETTINGS), every_seed=True) if finished(c[3], c[-1])]
    done = run_many([(out, ov, record) for *_, out, ov, record in cells])
    missing = [f"{setting} {name} seed {seed}" for setting, name, seed, _, _, record in plan(args.rounds, [0, 1, 2], list(SETTINGS))
               if not record.is_file()]
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for (setting, name, seed, *_), run in zip(cells, done):
        runs.setdefault(setting, {}).setdefault(name, {})[seed] = run
    tabulate(runs, args.rounds, missing)


def tabulate(runs: dict[str, dict[str, dict[int, dict]]], rounds: int, missing: list[str]) -> None:
    lines = [f"# HGC Tables 2-4 on FashionMNIST / cnn4 ({rounds} rounds, one recipe for every method)", "",
             "Regenerate: `.venv/bin/python experiments/hgc_table2/run.py" + (f" --rounds {rounds}" if rounds != 3000 else "") + " --jobs 2`"
             " (finished runs are read from results/runs/; `--table-only` runs nothing)", "",
             "Recipe (every method): 1 local SGD step of batch 32 per round, lr 0.05 (x0.1 at 50% and 75% of the rounds), "
             "weight decay 1e-3, persistent client optimizer with momentum 0 -> 0.3 -> 0.6 -> 0.9 at 30/50/70% of the rounds "
             "(DGC's momentum correction takes it), sparsifier warm-up 25% -> target over 300 rounds. "
             "Every cell ran on CPU (2-core machine, one thread per run). ± is the population std over seeds.", ""]
    summary: dict = {}
    for setting, methods_ in runs.items():
        fedavg = methods_.get("FedAvg", {})
        if not fedavg:
            continue
        seeds = sorted(fedavg)
        plateaus = {seed: plateau_round(fedavg[seed]["rows"]) for seed in seeds}
        fed_time = {seed: s["sim_time_s"] for seed, s in fedavg.items()}
        title = "4 clients, IID" if setting == "4iid" else "10 clients, Dirichlet(0.5)"
        lines += [f"## Table 2: {setting} ({title})", "",
                  "FedAvg plateau (first evaluation after which accuracy stays within 0.5 points of its final value): "
                  + ", ".join(f"seed {k}: round {v}" for k, v in plateaus.items()) + f" of {rounds}.", "",
                  "Speedup: FedAvg's simulated time over the method's for the same rounds (network=lan_1gbps: 1000 Mbit/s, "
                  "50 GFLOP/s clients, compute from FLOPs and codec time from the calibrated table; deterministic). "
                  "A record keeps the simulated times of the code that made it: a later recalibration of the codec-time "
                  "table (fedcomp/network/codec_times.json) changes new runs, not recorded ones. "
                  f"CR columns: seed {seeds[0]}; "
                  "'w/o sync' leaves round 1's downlink (the initial model) out of the method's bytes and the dense reference.", "",
                  "| method | seeds | final acc | best acc | Max CR up | Max CR down | Total CR up | Total CR down | Total CR total | "
                  "Total CR down w/o sync | Total CR total w/o sync | speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, by_seed in methods_.items():
            if "|" in name:
                continue
            s = by_seed[min(by_seed)]
            m, t, nosync = s["max_cr"], s["total_cr"], ratios_without_first_sync(s)
            speed = np.mean([speedup(fed_time[k], v["sim_time_s"]) for k, v in by_seed.items() if k in fed_time])
            lines.append(f"| {name} | {len(by_seed)} | {mean_std([v['final_accuracy'] for v in by_seed.values()])} | "
                         f"{mean_std([v['best_accuracy'] for v in by_seed.values()])} | {fmt(m['up'])} | {fmt(m['down'])} | "
                         f"{fmt(t['up'])} | {fmt(t['down'])} | {fmt(t['total'])} | {fmt(nosync['down'])} | {fmt(nosync['total'])} | {speed:.2f} |")
            summary.setdefault(setting, {})[name] = {
                "final_accuracy": {k: v["final_accuracy"] for k, v in by_seed.items()},
                "best_accuracy": {k: v["best_accuracy"] for k, v in by_seed.items()},
                "max_cr": m, "total_cr": t, "total_cr_without_first_sync": nosync, "speedup": speed,
            }
        lines += ["", "FedAvg - method, final accuracy in points, per seed both ran (a seed fixes the data order and the "
                  "initial model). The paper's claim (003_... Sec. 5.1) is about HGC: within 0.5 points of FedAvg, "
                  "judged here on the mean over seeds.", ""]
        gaps = summary[setting]["fedavg_minus_points"] = {}
        for name, by_seed in methods_.items():
            common = sorted(set(by_seed) & set(fedavg))
            if name == "FedAvg" or "|" in name or not common:
                continue
            gap = [100 * (fedavg[k]["final_accuracy"] - by_seed[k]["final_accuracy"]) for k in common]
            gaps[name] = dict(zip(common, gap))
            verdict = (": the claim " + ("holds" if np.mean(gap) <= 0.5 else "does not hold")) if name in ("HGC", *VARIANTS) else ""
            lines.append(f"- {name}: " + ", ".join(f"s{k} {g:+.2f}" for k, g in zip(common, gap))
                         + f"; mean {np.mean(gap):+.2f}{verdict}")
        lines.append("")
        summary[setting]["fedavg_plateau_round"] = plateaus
        if setting == "4iid" and all(a in methods_ for a in ABLATIONS):
            lines += ["## Table 3: decomposition of HGC's CR up = CR_i x CR_c x CR_t (4 clients, IID, first seed)", "",
                      "CR_i = CR up with own masks and no prediction; CR_c = (shared mask, no prediction) / (own masks, no prediction); "
                      "CR_t = (shared mask, prediction) / (shared mask, no prediction). The paper decomposes Max CR (the best "
                      "single round); the Total CR row decomposes the whole run's uplink bytes.", "",
                      "| statistic | (k/d, q) | CR_i | CR_c | CR_t | CR up |", "|---|---|---|---|---|---|"]
            for stat, label in (("max_cr", "Max CR up"), ("total_cr", "Total CR up")):
                full, nopred, own = (methods_[n][min(methods_[n])][stat]["up"] for n in ("HGC", *ABLATIONS))
                lines.append(f"| {label} | 0.001, 1 | {fmt(own)} | {fmt(nopred / own)} | {fmt(full / nopred)} | {fmt(full)} |")
            acc = {n: methods_[n][min(methods_[n])]["final_accuracy"] for n in ("HGC", *ABLATIONS)}
            lines += ["", f"Final accuracy: own masks, no prediction {acc[ABLATIONS[1]]:.4f}; shared mask, no prediction "
                      f"{acc[ABLATIONS[0]]:.4f}; shared mask with prediction (HGC) {acc['HGC']:.4f}.", ""]
        lines += momentum_step_table(setting, methods_, rounds)
        if setting == "4iid":
            lines += ["## Table 4: HGC variants over the whole run (4 clients, IID)", "",
                      "| (k/d, q) | Total CR up | speedup | accuracy |", "|---|---|---|---|"]
            for name, label in (("HGC", "0.001, 1"), ("HGC (1%, 1 bit)", "0.01, 1"), ("HGC (0.1%, 2 bits)", "0.001, 2")):
                if name in summary.get(setting, {}):
                    row = summary[setting][name]
                    lines.append(f"| {label} | {fmt(row['total_cr']['up'])} | {row['speedup']:.2f} | "
                                 f"{mean_std(list(row['final_accuracy'].values()))} |")
            lines.append("")
    if missing:
        lines += [f"Not run yet ({len(missing)} cells of the default plan): " + "; ".join(missing) + ".", ""]
    write_results(RESULTS, lines, summary, table="table2.md")
    plot(runs)


def momentum_step_table(setting: str, methods_: dict[str, dict[int, dict]], rounds: int, span: int = 25) -> list[str]:
    """First seed of each method around the last momentum step (0.9 at 70% of the rounds) and the
    second LR step (75%): test accuracy there and the mean training loss of the ``span`` rounds
    ending at each -- where HGC's gap opens."""
    at = [round(f * rounds) for f in (RAMP[-1][0], 0.75, 0.8)]
    lines = [f"## Where the gap opens: {setting}, first seed, around local momentum 0.9 (round {at[0]}) and the second LR step "
             f"(round {at[1]})", "",
             f"Train loss: mean over the {span} rounds up to that round. DGC, STC and HGC send a sparse 0.1% (one HGC row 1%) "
             "and keep the rest in error feedback; only DGC and 'HGC + momentum masking' also clear the momentum at the "
             "coordinates they send (DGC's momentum factor masking). EF-signSGD sends every coordinate's sign.", "",
             f"| method | train loss @{at[0]} | train loss @{at[1]} | acc @{at[0]} | acc @{at[1]} | acc @{at[2]} | final acc |",
             "|---|---|---|---|---|---|---|"]
    for name, by_seed in methods_.items():
        rows = by_seed[min(by_seed)]["rows"]
        loss = [np.mean([r["train_loss"] for r in rows[a - span : a]]) for a in at[:2]]
        acc = {r["round"]: r["accuracy"] for r in rows if r["accuracy"] is not None}
        if not all(a in acc for a in at):
            continue
        lines.append(f"| {name.replace('|', '/')} | {loss[0]:.3f} | {loss[1]:.3f} | " + " | ".join(f"{acc[a]:.4f}" for a in at)
                     + f" | {rows[-1]['accuracy']:.4f} |")
    return [*lines, ""]


def plot(runs: dict[str, dict[str, dict[int, dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(6.5 * len(runs), 8.5), squeeze=False)
    for col, (setting, methods_) in enumerate(runs.items()):
        for name, by_seed in methods_.items():
            if "|" in name:
                continue
            s = by_seed[min(by_seed)]
            total, xs, ys, rounds = 0, [], [], []
            for r in s["rows"]:
                total += r["bytes_up"] + r["bytes_down"]
                if r["accuracy"] is not None:
                    xs.append(total / 1e6)
                    ys.append(r["accuracy"])
                    rounds.append(r["round"])
            axes[0][col].plot(rounds, ys, marker=".", label=name)
            axes[1][col].plot(xs, ys, marker=".", label=name)
        axes[0][col].set(xlabel="round", ylabel="test accuracy", title=f"{setting} (first seed)", ylim=(0.7, 0.95))
        axes[1][col].set(xscale="log", xlabel="bytes moved, up + down (MB, log)", ylabel="test accuracy", ylim=(0.7, 0.95))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
