"""``fedcomp report DIR... [--out DIR] [--target ACC] [--html]``: compare runs.

Every directory below the given ones that holds a run (``metrics.jsonl``) is read: single
runs, sweeps (``multirun/``), experiment folders. Finished runs (``summary.json`` with status
ok) make one table row each -- the config keys that differ between the runs, final and best
accuracy, bytes up and down, Max / Total compression ratios, simulated time, and the round,
time and bytes at which the target accuracy was first reached -- written as ``report.md`` and
``report.csv``; the others are listed with their status. ``report.png`` plots test accuracy
against uplink bytes, downlink bytes, rounds and simulated time, one line per run; runs that
differ only in ``seed`` share a colour. ``--html`` also writes an interactive ``report.html``
(plotly, ``pip install 'fedcomp[report]'``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from fedcomp.runs import load_run

IGNORED = {"progress", "verbose", "name", "tags", "resume", "loggers", "checkpoint_every"}


def find_runs(roots: list[Path]) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """(finished runs with their summary and rows, other run directories with their status)."""
    finished, other = [], []
    found = {p.parent for root in roots for name in ("metrics.jsonl", "summary.json") for p in root.rglob(name)}
    # an experiment's results/summary.json is a table, not a run: runs have metrics or a config
    dirs = sorted(d for d in found if (d / "metrics.jsonl").is_file() or "config" in json.loads((d / "summary.json").read_text()))
    for d in dirs:
        if not (d / "summary.json").is_file():
            other.append((d, "incomplete (no summary.json)"))
            continue
        summary = json.loads((d / "summary.json").read_text())
        if summary.get("status", "ok") != "ok" or not (d / "metrics.jsonl").is_file():
            other.append((d, f"{summary.get('status', '?')}: {summary.get('reason', '')}"))
            continue
        finished.append((d, load_run(d)))
    return finished, other


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else tree}


def differing(runs: list[dict]) -> list[str]:
    """Config keys whose values are not the same in every run."""
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k.split(".")[0] not in IGNORED and len({repr(f.get(k)) for f in flat}) > 1]


def reached(rows: list[dict], target: float) -> dict | None:
    up = down = 0
    for r in rows:
        up, down = up + r["bytes_up"], down + r["bytes_down"]
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return {"round": r["round"], "sim_time_s": r["sim_time_s"], "bytes_up": up, "bytes_down": down}
    return None


def table(runs: list[tuple[Path, dict]], keys: list[str], target: float) -> list[dict[str, Any]]:
    out = []
    for d, s in runs:
        flat = flatten(s["config"])
        hit = reached(s["rows"], target)
        row = {"run": s.get("name") or str(d), **{k: flat.get(k) for k in keys},
               "final_acc": s["final_accuracy"], "best_acc": s["best_accuracy"], "rounds": s["rounds"],
               "MB_up": s["total_bytes_up"] / 1e6, "MB_down": s["total_bytes_down"] / 1e6,
               "max_cr_up": s.get("max_cr", {}).get("up"), "total_cr_up": s.get("total_cr", {}).get("up"),
               "total_cr_down": s.get("total_cr", {}).get("down"), "sim_time_s": s["sim_time_s"],
               f"round_to_{target:g}": hit and hit["round"], f"sim_s_to_{target:g}": hit and hit["sim_time_s"],
               f"MB_up_to_{target:g}": hit and hit["bytes_up"] / 1e6, f"MB_down_to_{target:g}": hit and hit["bytes_down"] / 1e6}
        out.append(row)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def label(s: dict, keys: list[str], where: Path | None = None) -> str:
    """The differing settings, or the run's name / directory when they would not fit a legend."""
    flat = flatten(s["config"])
    text = ", ".join(f"{k}={flat.get(k)}" for k in keys)
    if text and len(text) <= 90:
        return text
    return s.get("name") or ("/".join(where.parts[-2:]) if where is not None else text or "run")


def curves(s: dict) -> dict[str, list[float]]:
    up = down = 0
    out: dict[str, list[float]] = {"up": [], "down": [], "round": [], "time": [], "acc": []}
    for r in s["rows"]:
        up, down = up + r["bytes_up"], down + r["bytes_down"]
        if r["accuracy"] is not None:
            for key, value in (("up", up / 1e6), ("down", down / 1e6), ("round", r["round"]), ("time", r["sim_time_s"]), ("acc", r["accuracy"])):
                out[key].append(value)
    return out


AXES = (("up", "uplink bytes (MB)", "log"), ("down", "downlink bytes (MB)", "log"), ("round", "round", "linear"),
        ("time", "simulated time (s)", "linear"))


def plot(runs: list[tuple[Path, dict]], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_keys = [k for k in keys if k != "seed"]
    groups = sorted({label(s, group_keys) for _, s in runs})
    colours = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for d, s in runs:
        c = curves(s)
        group = label(s, group_keys)
        for ax, (key, name, scale) in zip(axes.flat, AXES):
            ax.plot(c[key], c["acc"], marker=".", color=colours[group], label=label(s, keys, d), alpha=0.85)
            ax.set(xlabel=name, ylabel="test accuracy", xscale=scale)
            ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.018 * ((len(names) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def html(runs: list[tuple[Path, dict]], keys: list[str], rows: list[dict], path: Path) -> None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise SystemExit("fedcomp report --html needs plotly: pip install 'fedcomp[report]'") from None
    fig = make_subplots(rows=2, cols=2, subplot_titles=[name for _, name, _ in AXES])
    for i, (d, s) in enumerate(runs):
        c = curves(s)
        for j, (key, name, scale) in enumerate(AXES):
            fig.add_trace(go.Scatter(x=c[key], y=c["acc"], mode="lines+markers", name=label(s, keys, d), legendgroup=str(i),
                                     showlegend=j == 0), row=j // 2 + 1, col=j % 2 + 1)
            fig.update_xaxes(type=scale, title_text=name, row=j // 2 + 1, col=j % 2 + 1)
    table_html = "<table border=1><tr>" + "".join(f"<th>{k}</th>" for k in rows[0]) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows) + "</table>"
    path.write_text(f"<html><body>{fig.to_html(full_html=False, include_plotlyjs=True)}{table_html}</body></html>")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fedcomp report", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("report"))
    ap.add_argument("--target", type=float, default=None, help="accuracy for the to-target columns (default: each run's target_accuracy, else 0.8)")
    ap.add_argument("--html", action="store_true")
    args = ap.parse_args(argv)
    runs, other = find_runs(args.dirs)
    if not runs:
        print(f"no finished runs under {', '.join(map(str, args.dirs))}")
        for d, status in other:
            print(f"  {d}: {status}")
        return 1
    target = args.target or next((s.get("target_accuracy") for _, s in runs if s.get("target_accuracy")), 0.8)
    keys = differing([s for _, s in runs])
    rows = table(runs, keys, target)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {len(runs)} runs ({len(other)} not finished)", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(_cell(v) for v in r.values()) + " |" for r in rows]
    if other:
        lines += ["", "Not in the table:", ""] + [f"- {d}: {status}" for d, status in other]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    plot(runs, keys, args.out / "report.png")
    if args.html:
        html(runs, keys, rows, args.out / "report.html")
    print("\n".join(lines))
    print(f"\nwrote {args.out}/report.md, report.csv, report.png" + (", report.html" if args.html else ""))
    return 0
