"""Run a `fedcomp` experiment into a directory once, and read runs back (for experiment scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def load_run(out_dir: Path) -> dict[str, Any]:
    """summary.json plus the per-round records as ``rows``."""
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["rows"] = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary


def run_once(out_dir: Path, overrides: list[str], label: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``fedcomp <overrides>`` into ``out_dir`` unless it already holds a finished run."""
    if not (out_dir / "summary.json").is_file():
        print(f"running {label or out_dir.name}", flush=True)
        cmd = [sys.executable, "-m", "fedcomp", *overrides, "progress=false", f"hydra.run.dir={out_dir}"]
        subprocess.run(cmd, check=True, env=env)
    return load_run(out_dir)


def run_many(runs: Sequence[tuple[Path, list[str]]], jobs: int = 1) -> list[dict[str, Any]]:
    """``run_once`` for each (out_dir, overrides), ``jobs`` processes at a time, results in order.
    Parallel runs get one intra-op thread each, so ``jobs`` processes share ``jobs`` cores
    instead of oversubscribing them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if jobs > 1 else None
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return list(pool.map(lambda run: run_once(run[0], run[1], env=env), runs))


def first_round(rows: list[dict[str, Any]], key: str, reached) -> dict[str, Any] | None:
    """The first evaluated round whose ``key`` satisfies ``reached``, with the bytes moved up to it."""
    up = down = 0
    for r in rows:
        up += r["bytes_up"]
        down += r["bytes_down"]
        if r.get(key) is not None and reached(r[key]):
            return {"round": r["round"], "bytes_up": up, "bytes_down": down}
    return None


def write_results(results_dir: Path, lines: list[str], summary: dict[str, Any], table: str = "table.md") -> None:
    """Write an experiment's Markdown table and JSON summary, and print the table."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / table).write_text("\n".join(lines) + "\n")
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
