"""Which compression wins depends on the link: time-to-accuracy and bytes of FedAvg, top-k, STC,
HGC and DAGC on four networks under three round policies (issue "deterministic clock", item 5).

FashionMNIST, mlp (784-200-10), 20 clients with Dirichlet(0.5) labels, 10 sampled per round, 5
local SGD steps of batch 32 at lr 0.05 (the same for every method), 80 rounds, one seed. The
simulated clock is the deterministic one: compute from the model's training FLOPs over each
device's speed, codec times from the calibrated table, links from the preset (sources in
``fedcomp/conf/network/*.yaml``).

Networks: ``lan_1gbps``, ``wan_100mbps``, ``mobile_4g`` (lognormal spread across clients) and
``mixed``: the trace ``mixed_links.csv`` (4 clients on a LAN, 6 on home broadband, 10 phones
on 4G; numbers from the presets' sources). Policies: ``sync`` (wait for every sampled client),
``deadline`` (at 80% of FedAvg's median synchronous round on that network: late clients'
updates are discarded) and ``overcommit`` (sample ceil(1.3 x 10), aggregate the first 10).
Methods: FedAvg (fp32 both ways), top-k 1% + EF (fp32 model down), STC 1% both ways, HGC
(1%, 1 bit), DAGC (top-k + EF with per-client ratios from data volume, mean 1%).

    .venv/bin/python experiments/network_regimes/run.py [--rounds 80] [--target 0.75] [--jobs 2]

Results: results/table.md (time and bytes to the target, final accuracy), results/summary.json,
results/accuracy_vs_time.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from fedcomp.runs import load_run, run_many, write_results

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RUNS = ROOT / "outputs" / "network_regimes"
RESULTS = HERE / "results"

NETWORKS = {
    "lan_1gbps": ["network=lan_1gbps"],
    "wan_100mbps": ["network=wan_100mbps"],
    "mobile_4g": ["network=mobile_4g"],
    "mixed": ["network=mobile_4g", "network.heterogeneity.kind=csv", f"network.heterogeneity.path={HERE / 'mixed_links.csv'}"],
}
METHODS = {
    "FedAvg": ["compressor=none"],
    "top-k 1% + EF": ["compressor=topk", "compressor.up.ratio=0.01"],
    "STC 1%": ["compressor=stc", "compressor.up.ratio=0.01", "compressor.down.ratio=0.01"],
    "HGC 1%, 1 bit": ["strategy=hgc", "strategy.ratio=0.01", "strategy.bits=1"],
    "DAGC 1%": ["compressor=topk", "controller=dagc", "controller.mean_ratio=0.01"],
}
POLICIES = ("sync", "deadline", "overcommit")
RECIPE = ("Recipe (every method): 20 clients with Dirichlet(0.5) labels, 10 sampled per round, 5 local SGD steps"
          " of batch 32, lr 0.05, no momentum, fresh optimizer each round, mlp 784-200-10; every cell ran on CPU.")
DEADLINE_SHARE = 0.8  # of FedAvg's median synchronous round on the same network


def base(rounds: int) -> list[str]:
    return ["dataset=fmnist", "model=mlp", "model.hidden=[200]", "partition=dirichlet", "partition.alpha=0.5",
            "simulation.num_clients=20", "simulation.fraction=0.5", f"num_rounds={rounds}", "train.steps=5",
            "train.batch_size=32", "train.lr=0.05", f"eval_every={max(1, rounds // 30)}", "seed=0"]


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def out_dir(rounds: int, network: str, policy: str, method: str) -> Path:
    return RUNS / f"r{rounds}" / network / policy / slug(method)


def policy_overrides(policy: str, deadline_s: float | None) -> list[str]:
    if policy == "deadline":
        return ["strategy.round=deadline", f"strategy.deadline_s={deadline_s:.6g}"]
    if policy == "overcommit":
        return ["strategy.round=overcommit", "strategy.overcommit=1.3"]
    return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()

    def cells(policy: str, deadlines: dict[str, float] | None = None) -> list[tuple[str, str, Path, list[str]]]:
        return [(net, m, out_dir(args.rounds, net, policy, m),
                 [*base(args.rounds), *NETWORKS[net], *METHODS[m], *policy_overrides(policy, (deadlines or {}).get(net))])
                for net in NETWORKS for m in METHODS]

    sync = cells("sync")
    if not args.table_only:
        run_many([(o, ov) for *_, o, ov in sync], jobs=args.jobs)
    deadlines = {net: DEADLINE_SHARE * statistics.median(r["round_sim_time_s"] for r in load_run(out_dir(args.rounds, net, "sync", "FedAvg"))["rows"])
                 for net in NETWORKS if (out_dir(args.rounds, net, "sync", "FedAvg") / "summary.json").is_file()}
    plan = {"sync": sync, "deadline": cells("deadline", deadlines), "overcommit": cells("overcommit")}
    if not args.table_only:
        run_many([(o, ov) for p in ("deadline", "overcommit") for *_, o, ov in plan[p]], jobs=args.jobs)
    runs = {(p, net, m): load_run(o) for p, cs in plan.items() for net, m, o, _ in cs if (o / "summary.json").is_file()}
    tabulate(runs, args.rounds, args.target, deadlines)


def to_target(run: dict, target: float) -> dict | None:
    up = down = 0
    for r in run["rows"]:
        up, down = up + r["bytes_up"], down + r["bytes_down"]
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return {"round": r["round"], "sim_time_s": r["sim_time_s"], "bytes": up + down}
    return None


def tabulate(runs: dict, rounds: int, target: float, deadlines: dict[str, float]) -> None:
    lines = [f"# Time to {target:.0%} accuracy by network and round policy (FashionMNIST / mlp, {rounds} rounds, 1 seed, CPU)", "",
             f"Regenerate: `.venv/bin/python experiments/network_regimes/run.py --rounds {rounds} --target {target}`", "",
             RECIPE, "",
             "Each cell: simulated seconds to the target (deterministic clock) / MB moved both ways until then; "
             "`-`: not reached in the run. Final accuracy in brackets. **Bold**: fastest on that network and policy. "
             "Deadlines (80% of FedAvg's median synchronous round): "
             + ", ".join(f"{net} {d:.3g} s" for net, d in deadlines.items()) + ".", ""]
    summary: dict = {"deadlines_s": deadlines, "target": target, "cells": {}}
    for policy in POLICIES:
        lines += [f"## {policy}", "", "| method | " + " | ".join(NETWORKS) + " |", "|---|" + "---|" * len(NETWORKS)]
        best = {}
        for net in NETWORKS:
            times = {m: (to_target(runs[(policy, net, m)], target) or {}).get("sim_time_s", math.inf)
                     for m in METHODS if (policy, net, m) in runs}
            best[net] = min(times, key=times.get) if times and min(times.values()) < math.inf else None
        for m in METHODS:
            row = [m]
            for net in NETWORKS:
                run = runs.get((policy, net, m))
                if run is None:
                    row.append("not run")
                    continue
                hit = to_target(run, target)
                summary["cells"][f"{policy}/{net}/{m}"] = {"to_target": hit, "final_accuracy": run["final_accuracy"],
                                                          "sim_time_s": run["rows"][-1]["sim_time_s"]}
                cell = f"{hit['sim_time_s']:.1f} s / {hit['bytes'] / 1e6:.1f} MB" if hit else "-"
                cell += f" ({run['final_accuracy']:.3f})"
                row.append(f"**{cell}**" if best[net] == m else cell)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    write_results(RESULTS, lines, summary)
    plot(runs)


def plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(POLICIES), len(NETWORKS), figsize=(4 * len(NETWORKS), 3 * len(POLICIES)), squeeze=False)
    for i, policy in enumerate(POLICIES):
        for j, net in enumerate(NETWORKS):
            ax = axes[i][j]
            for m in METHODS:
                run = runs.get((policy, net, m))
                if run is None:
                    continue
                pts = [(r["sim_time_s"], r["accuracy"]) for r in run["rows"] if r["accuracy"] is not None]
                ax.plot(*zip(*pts), label=m)
            ax.set_xscale("log")
            ax.set_title(f"{net}, {policy}", fontsize=9)
            ax.set_xlabel("simulated s")
            ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_vs_time.png", dpi=110)


if __name__ == "__main__":
    main()
