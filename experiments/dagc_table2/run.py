"""DAGC Table II style comparison on FashionMNIST, 10 clients.

Skew ratio {10, 100, 1000} (volume skew with Dirichlet(0.5) labels) x mean ratio
{10%, 1%, 0.1%}; DAGC (Algorithm 2 and the exact optimum) vs Top-delta (uniform) vs ACCORDION
(switching between the min and max of DAGC's ratios); top-k with error feedback, one local
step per round; accuracy after a fixed number of rounds, mean and spread over seeds, and Table
II's claim (DAGC above Top-delta at SR >= 100) as paired per-seed differences.

``--series``: ``geometric`` (default) sizes the clients as the authors' code does
(log-spaced, ``partition.series=geometric``); ``arithmetic`` follows the paper's text
(results/arithmetic/, the earlier table). Where DAGC (exact) gives every client the same k as
Top-delta, the two runs would be identical, so the DAGC (exact) cell reuses the Top-delta run
and the table says how many seeds did.

    .venv/bin/python experiments/dagc_table2/run.py [--series geometric] [--model cnn4] [--rounds 300]
        [--seeds 0 1 2] [--jobs 2] [--table-only] [--set train.device=cuda ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedcomp.allocation import dagc_phi, dagc_ratios
from fedcomp.compression.selectors import budget
from fedcomp.config import compose_config
from fedcomp.data import load_dataset
from fedcomp.models import StateLayout, build_model
from fedcomp.partition import make_partition
from fedcomp.runs import finished, plateau_round, run_many, write_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "outputs" / "dagc_table2"
RESULTS = Path(__file__).parent / "results"


METHODS = ("Top-delta", "DAGC (paper)", "DAGC (exact)", "ACCORDION")


def methods(weights: np.ndarray, mean: float) -> dict[str, list[str]]:
    deltas = dagc_ratios(weights, mean, "paper")
    return {
        "Top-delta": ["controller=uniform", f"controller.ratio={mean}"],
        "DAGC (paper)": ["controller=dagc", f"controller.mean_ratio={mean}", "controller.method=paper"],
        "DAGC (exact)": ["controller=dagc", f"controller.mean_ratio={mean}", "controller.method=exact"],
        "ACCORDION": ["controller=accordion", f"controller.low={deltas.min()}", f"controller.high={deltas.max()}"],
    }


def partition_weights(overrides: list[str]) -> tuple[np.ndarray, int]:
    """The data weights p_i of this run's actual partition (what the DAGC controllers see) and d."""
    cfg = compose_config(overrides)
    train, _ = load_dataset(cfg.dataset)
    weights = make_partition(cfg.partition, train.y.numpy(), train.num_classes, cfg.simulation.num_clients, cfg.seed).weights
    return weights, StateLayout.of(build_model(cfg.model, train.input_shape, train.num_classes, cfg.seed)).numel


def same_k_as_uniform(weights: np.ndarray, d: int, mean: float) -> bool:
    """Whether DAGC (exact) keeps the same k on every client as Top-delta."""
    return all(budget(d, float(r), None) == budget(d, mean, None) for r in dagc_ratios(weights, mean, "exact"))


Cell = tuple[float, float, str]  # (skew ratio, mean ratio, method)
Grid = tuple[dict[Path, list[str]], list[tuple[Cell, int, Path]], dict[tuple[float, float], list[tuple[int, Path]]],
             dict[tuple[float, int], np.ndarray]]


def grid(args: argparse.Namespace, skews: list[float], means: list[float], seeds: list[int]) -> Grid:
    """The runs of a (skew x mean x seed) grid: overrides per run directory, the table cell and seed
    each run counts for, the (seed, run) pairs in which DAGC (exact) shares Top-delta's run, and
    the data weights p_i per (skew, seed)."""
    runs: dict[Path, list[str]] = {}
    weights_of: dict[tuple[float, int], np.ndarray] = {}
    cells: list[tuple[Cell, int, Path]] = []
    shared: dict[tuple[float, float], list[tuple[int, Path]]] = {}
    for skew in skews:
        for seed in seeds:
            base = ["dataset=fmnist", f"model={args.model}", "simulation.num_clients=10", "partition=volume_skew",
                    f"partition.skew_ratio={skew}", "partition.label_alpha=0.5", f"partition.series={args.series}",
                    "compressor=topk", f"num_rounds={args.rounds}", f"train.steps={args.steps}", f"eval_every={args.eval_every or args.rounds}",
                    f"seed={seed}"]
            weights, d = partition_weights(base)
            weights_of[skew, seed] = weights
            for mean in means:
                reuse = same_k_as_uniform(weights, d, mean)
                for name, ov in methods(weights, mean).items():
                    tag = "Top-delta" if reuse and name == "DAGC (exact)" else name.replace(" ", "_").replace("(", "").replace(")", "")
                    prefix = "" if args.series == "arithmetic" and args.model == "cnn4" else f"{args.series}_{args.model}_"
                    run = RUNS / f"{prefix}r{args.rounds}x{args.steps}_sr{skew:g}_d{mean:g}_s{seed}_{tag}"
                    runs.setdefault(run, base + ov + args.set)
                    cells.append(((skew, mean, name), seed, run))
                    if reuse and name == "DAGC (exact)":
                        shared.setdefault((skew, mean), []).append((seed, run))
    return runs, sorted(cells, key=lambda c: (c[0][0], -c[0][1])), shared, weights_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", choices=["geometric", "arithmetic"], default="geometric")
    ap.add_argument("--model", default="cnn4")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skews", type=float, nargs="+", default=[10.0, 100.0, 1000.0])
    ap.add_argument("--means", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    ap.add_argument("--steps", type=int, default=1, help="local SGD steps per round")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="run only these (the table covers every recorded one)")
    ap.add_argument("--eval-every", type=int, default=None, metavar="N",
                    help="also evaluate every N rounds (default: after the last round only), to see where accuracy plateaus")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    ap.add_argument("--table-only", action="store_true", help="tabulate the finished (recorded) runs, run nothing")
    ap.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE",
                    help="extra overrides for every run, e.g. train.device=cuda dataset.root=DIR")
    args = ap.parse_args()
    # Finished runs are kept as records, so that seeds and cells can be added later. Runs of another
    # length than the table's 300 x 1 get a folder of their own.
    results = RESULTS / (args.series if (args.rounds, args.steps) == (300, 1) else f"{args.series}_r{args.rounds}x{args.steps}")
    records = results / "runs"

    def record(run: Path) -> Path:
        return records / f"{run.name}.json.gz"

    if not args.table_only:
        todo, planned, *_ = grid(args, args.skews, args.means, args.seeds)
        chosen = {run for (_, _, name), _, run in planned if name in args.methods}
        run_many([(run, ov, record(run)) for run, ov in todo.items() if run in chosen], args.jobs)
    # The table covers every finished run of the default grid and of this call's, whatever this call ran.
    runs, cells, shared, weights_of = grid(args, sorted({10.0, 100.0, 1000.0, *args.skews}), sorted({0.1, 0.01, 0.001, *args.means}),
                                           sorted({0, 1, 2, *args.seeds}))
    runs = {run: ov for run, ov in runs.items() if finished(run, record(run))}
    cells = [(cell, seed, run) for cell, seed, run in cells if run in runs]
    if not cells:
        raise SystemExit(f"no recorded runs under {records}: nothing to tabulate (the table there is left as it is)")
    summaries = dict(zip(runs, run_many([(run, ov, record(run)) for run, ov in runs.items()])))
    by_seed: dict[Cell, dict[int, float]] = {}
    curves: dict[Cell, dict[int, list[dict]]] = {}
    on_gpu: dict[Cell, int] = {}
    for cell, seed, run in cells:
        by_seed.setdefault(cell, {})[seed] = summaries[run]["final_accuracy"]
        curves.setdefault(cell, {})[seed] = summaries[run]["rows"]
        on_gpu[cell] = on_gpu.get(cell, 0) + (summaries[run]["config"]["train"].get("device", "cpu") != "cpu")
    lines = [f"# DAGC Table II style on FashionMNIST / {args.model}, {args.series} skew series "
             f"({args.rounds} rounds x {args.steps} local steps, every recorded seed)", "",
             f"Regenerate: `.venv/bin/python experiments/dagc_table2/run.py --series {args.series} --model {args.model} "
             f"--rounds {args.rounds} --steps {args.steps}"
             + (f" --eval-every {args.eval_every}" if args.eval_every else "") + "".join(f" --set {o}" for o in args.set) + "`", "",
             "Recipe (every method): top-k with error feedback, one SGD step of batch 32 per round, lr 0.05, no momentum.", "",
             "Accuracy after the last round; std over seeds (population std). DAGC (exact) shares the Top-delta",
             "run for the seeds listed (identical k on every client). Runs trained on a GPU (`train.device=cuda`)",
             "are counted in the last column; the others on CPU.", "",
             "| skew ratio | mean ratio | method | seeds run | accuracy mean | accuracy std | seeds shared with Top-delta | runs on GPU |",
             "|---|---|---|---|---|---|---|---|"]
    accs = {cell: list(a.values()) for cell, a in by_seed.items()}
    out = {}
    for (skew, mean, name), a in accs.items():
        out[f"sr{skew:g}/d{mean:g}/{name}"] = a
        note = " ".join(str(seed) for seed, run in shared.get((skew, mean), []) if run in runs) if name == "DAGC (exact)" else ""
        spread = f"{np.std(a):.4f}" if len(a) > 1 else "-"
        lines.append(f"| {skew:g} | {mean:g} | {name} | {len(a)} | {np.mean(a):.4f} | {spread} | {note} | {on_gpu[skew, mean, name]} |")
    gaps = paired_gaps(by_seed)
    lines += claim_lines(gaps, weights_of)
    evaluated_along = any(len(evaluated(rows)) > 1 for per_seed in curves.values() for rows in per_seed.values())
    if evaluated_along:
        lines += over_rounds_lines(curves, args.rounds)
    write_results(results, lines, {"accuracy": out, "dagc_minus_top_delta": {
        f"sr{skew:g}/d{mean:g}/{name}": {str(seed): g for seed, g in per_seed.items()} for (skew, mean, name), per_seed in gaps.items()}})
    if evaluated_along:
        plot_curves(curves, results / "accuracy_vs_rounds.png")
    plot(accs, results / "accuracy.png")


def paired_gaps(by_seed: dict[Cell, dict[int, float]]) -> dict[Cell, dict[int, float]]:
    """DAGC's accuracy minus Top-delta's in points, per (skew, mean, DAGC variant) and seed, for the
    seeds both ran: a seed's runs share the partition, the model's initialisation and the batches,
    so the difference is paired."""
    gaps: dict[Cell, dict[int, float]] = {}
    for (skew, mean, name), accs in by_seed.items():
        base = by_seed.get((skew, mean, "Top-delta"), {})
        if name.startswith("DAGC") and (seeds := sorted(accs.keys() & base.keys())):
            gaps[skew, mean, name] = {s: 100 * (accs[s] - base[s]) for s in seeds}
    return gaps


def evaluated(rows: list[dict]) -> dict[int, float]:
    """A run's test accuracy by the rounds it was evaluated after."""
    return {r["round"]: r["accuracy"] for r in rows if r.get("accuracy") is not None}


def over_rounds_lines(curves: dict[Cell, dict[int, list[dict]]], rounds: int) -> list[str]:
    """Mean accuracy over seeds at the short table's horizon (300) and at quarters of the run,
    each method's plateau round per seed, and DAGC - Top-delta (paired, mean over seeds) at
    the same rounds: does the ordering after 300 rounds last?"""
    acc = {cell: {seed: evaluated(rows) for seed, rows in per_seed.items()} for cell, per_seed in curves.items()}
    marks = sorted({300, *(rounds * q // 4 for q in (1, 2, 3, 4))} & {r for per_seed in acc.values() for a in per_seed.values() for r in a})
    lines = ["", "## Over the rounds: does the ordering after 300 rounds last?", "",
             "Test accuracy, mean over seeds; DAGC rows add DAGC - Top-delta in points (paired per seed, mean). Plateau: the",
             "first evaluation after which a run's accuracy stays within 0.5 points of its final value, per seed.", "",
             "| skew ratio | mean ratio | method | " + " | ".join(f"round {r}" for r in marks) + " | plateau round per seed |",
             "|---|---|---|" + "---|" * len(marks) + "---|"]
    for (skew, mean, name), per_seed in acc.items():
        base = acc.get((skew, mean, "Top-delta"), {})
        cols = []
        for r in marks:
            accs = [a[r] for a in per_seed.values() if r in a]
            cell = f"{np.mean(accs):.4f}" if accs else "-"
            gaps = [100 * (a[r] - base[s][r]) for s, a in per_seed.items() if r in a and r in base.get(s, {})]
            if name.startswith("DAGC") and gaps:
                cell += f" ({np.mean(gaps):+.2f})"
            cols.append(cell)
        plateaus = ", ".join(f"s{s}: {plateau_round(rows)}" for s, rows in curves[skew, mean, name].items())
        lines.append(f"| {skew:g} | {mean:g} | {name} | " + " | ".join(cols) + f" | {plateaus} |")
    return lines


def plot_curves(curves: dict[Cell, dict[int, list[dict]]], path: Path) -> None:
    """Test accuracy over rounds, mean over seeds, one panel per (skew, mean) cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(skew, mean) for skew, mean, _ in curves}, key=lambda c: (c[0], -c[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (skew, mean) in zip(axes[0], panels):
        for (s, m, name), per_seed in curves.items():
            if (s, m) != (skew, mean):
                continue
            acc = [evaluated(rows) for rows in per_seed.values()]
            rounds = sorted({r for a in acc for r in a})
            means = [np.mean([a[r] for a in acc if r in a]) for r in rounds]
            ax.plot(rounds, means, label=f"{name} ({len(per_seed)} seeds)")
        ax.set_title(f"SR {skew:g}, mean ratio {mean:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def phi_over_uniform(weights: np.ndarray, mean: float, method: str) -> float:
    """Phi of DAGC's ratios over Phi of uniform ones (000_... Sec. IV-C: iterations to a given
    accuracy grow linearly in Phi, so below 1 predicts DAGC ahead)."""
    return dagc_phi(weights, dagc_ratios(weights, mean, method)) / dagc_phi(weights, np.full(len(weights), mean))


def claim_lines(gaps: dict[Cell, dict[int, float]], weights_of: dict[tuple[float, int], np.ndarray]) -> list[str]:
    """Table II's claim, cell by cell: at SR >= 100, DAGC above Top-delta after the same rounds
    (000_... Sec. V-C), as paired per-seed differences, beside what the paper's theory predicts."""
    lines = ["", "## Table II's claim: DAGC above Top-delta when SR >= 100 (000_... Sec. V-C)", "",
             "DAGC's accuracy minus Top-delta's, in points, per seed (a seed's runs share the partition, the",
             "initial model and the batches). The paper makes no claim at SR 10. Phi / Phi(uniform): DAGC's",
             "dominant term (Sec. IV-C, linear in the iterations to converge) over uniform ratios', for the",
             "run's data weights (mean over seeds); below 1 predicts DAGC ahead.", "",
             "| skew ratio | mean ratio | DAGC | per seed | mean | seeds ahead / behind | Phi / Phi(uniform) |",
             "|---|---|---|---|---|---|---|"]
    for (skew, mean, name), per_seed in gaps.items():
        values = list(per_seed.values())
        method = "paper" if "paper" in name else "exact"
        phi = np.mean([phi_over_uniform(weights_of[skew, s], mean, method) for s in per_seed])
        lines.append(f"| {skew:g} | {mean:g} | {name} | " + ", ".join(f"s{s}: {v:+.2f}" for s, v in per_seed.items())
                     + f" | {np.mean(values):+.2f} | {sum(v > 0 for v in values)} / {sum(v < 0 for v in values)} | {phi:.3f} |")
    return lines


def plot(accs: dict[tuple[float, float, str], list[float]], path: Path) -> None:
    """Mean accuracy and seed spread per (skew ratio, mean ratio) cell, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(skew, mean) for skew, mean, _ in accs}, key=lambda c: (c[0], -c[1]))
    names = list(dict.fromkeys(name for _, _, name in accs))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [accs.get((skew, mean, name), [np.nan]) for skew, mean in cells]  # a cell not run yet has no bar
        ax.bar(np.arange(len(cells)) + j * width, [np.mean(v) for v in vals], width,
               yerr=[np.std(v) for v in vals], label=name, capsize=2)
    ax.set_xticks(np.arange(len(cells)) + 0.4 - width / 2, [f"SR {s:g}\nmean {m:g}" for s, m in cells])
    lows = [np.mean(v) - np.std(v) for v in accs.values()]
    ax.set_ylim(min(lows) - 0.02, max(np.mean(v) + np.std(v) for v in accs.values()) + 0.01)
    ax.set_ylabel("final test accuracy")
    ax.legend(ncol=len(names), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
