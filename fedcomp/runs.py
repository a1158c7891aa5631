"""Run a `fedcomp` experiment into a directory once, and read runs back (for experiment scripts).

A run may also be kept as a *record*: its summary and a compact copy of its per-round rows in one
gzipped JSON file that an experiment commits beside its table, so the table can be rebuilt, and
more seeds added, on a checkout that no longer has the run's output directory.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def load_run(out_dir: Path) -> dict[str, Any]:
    """summary.json plus the per-round records as ``rows``."""
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["rows"] = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary


# What a record keeps of each round: enough for accuracy curves, byte totals per direction and
# client, and simulated time; the rest of a row (losses per client, clock details) stays in outputs/.
ROW_KEYS = ("round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "num_clients", "failures", "skipped",
            "round_sim_time_s", "sim_time_s")
CLIENT_KEYS = ("bytes_up", "bytes_down")


def save_record(run: dict[str, Any], path: Path) -> None:
    """Write ``run`` (as ``load_run`` returns it) as a compact, byte-stable gzipped JSON record."""
    rows = [{**{k: r[k] for k in ROW_KEYS if k in r},
             "clients": {cid: {k: c[k] for k in CLIENT_KEYS} for cid, c in r.get("clients", {}).items()}} for r in run["rows"]]
    text = json.dumps({**run, "rows": rows}, separators=(",", ":"), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0))


def load_record(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()))


def finished(out_dir: Path, record: Path | None = None) -> bool:
    """Whether a run is done: recorded, or its output directory holds its summary."""
    return (record is not None and record.is_file()) or (out_dir / "summary.json").is_file()


def run_once(out_dir: Path, overrides: list[str], label: str = "", env: dict[str, str] | None = None,
             record: Path | None = None) -> dict[str, Any]:
    """Run ``fedcomp <overrides>`` into ``out_dir`` unless it already holds a finished run, or
    ``record`` exists (then that is the run); a run made or found in ``out_dir`` is recorded there."""
    if record is not None and record.is_file():
        return load_record(record)
    if not finished(out_dir):
        print(f"running {label or out_dir.name}", flush=True)
        cmd = [sys.executable, "-m", "fedcomp", *overrides, "progress=false", f"hydra.run.dir={out_dir}"]
        subprocess.run(cmd, check=True, env=env)
    run = load_run(out_dir)
    if record is not None:
        save_record(run, record)
    return run


def run_many(runs: Sequence[tuple[Path, list[str]] | tuple[Path, list[str], Path]], jobs: int = 1) -> list[dict[str, Any]]:
    """``run_once`` for each (out_dir, overrides[, record]), ``jobs`` processes at a time, results
    in order. Parallel runs get one intra-op thread each, so ``jobs`` processes share ``jobs``
    cores instead of oversubscribing them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if jobs > 1 else None
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return list(pool.map(lambda run: run_once(run[0], run[1], env=env, record=run[2] if len(run) > 2 else None), runs))


def first_round(rows: list[dict[str, Any]], key: str, reached) -> dict[str, Any] | None:
    """The first evaluated round whose ``key`` satisfies ``reached``, with the bytes moved up to it."""
    up = down = 0
    for r in rows:
        up += r["bytes_up"]
        down += r["bytes_down"]
        if r.get(key) is not None and reached(r[key]):
            return {"round": r["round"], "bytes_up": up, "bytes_down": down}
    return None


def plateau_round(rows: list[dict[str, Any]], tolerance: float = 0.005) -> int:
    """The first evaluated round from which test accuracy stays within ``tolerance`` of the
    run's final accuracy (the last evaluated round when it never settles before it)."""
    evaluated = [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
    final = evaluated[-1][1]
    for i, (rnd, _) in enumerate(evaluated):
        if all(abs(a - final) <= tolerance for _, a in evaluated[i:]):
            return rnd
    return evaluated[-1][0]


def mean_std(values: list[float], fmt: str = ".4f") -> str:
    """"mean ± population std" for a table cell (the value alone when there is one)."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format(float(np.std(values)), fmt)}"


def write_results(results_dir: Path, lines: list[str], summary: dict[str, Any], table: str = "table.md") -> None:
    """Write an experiment's Markdown table and JSON summary, and print the table."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / table).write_text("\n".join(lines) + "\n")
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
