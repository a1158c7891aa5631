"""Writes metrics.jsonl / metrics.csv per round, partition.json once, summary.json at the end.

Every file is valid JSON / CSV: a non-finite number (a diverged loss) is written as null.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedcomp.metrics.accounting import compression_ratios
from fedcomp.metrics.records import RoundStats
from fedcomp.partition import Partition

CSV_COLUMNS = (
    "round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "overhead_up", "overhead_down", "num_clients",
    "failures", "skipped", "round_sim_time_s", "sim_time_s", "wall_time_s",
)
# Accuracies whose first-reach time and bytes summary.json reports (plus target_accuracy).
DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


class MetricsRecorder:
    def __init__(self, out_dir: str | Path, cfg: DictConfig, target_accuracy: float | None = None, dense_bytes: int | None = None) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.target = target_accuracy
        self.dense_bytes = dense_bytes
        self._client_rows: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.sim_time = 0.0
        self._jsonl = (self.out / "metrics.jsonl").open("w")
        self._csv_file = (self.out / "metrics.csv").open("w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS)
        self._csv.writeheader()

    def save_partition(self, partition: Partition) -> None:
        (self.out / "partition.json").write_text(json.dumps({
            "label_counts": partition.label_counts().tolist(),
            "sizes": partition.sizes.tolist(),
            "weights": partition.weights.tolist(),
        }))

    def record(self, stats: RoundStats, accuracy: float | None, loss: float | None) -> dict[str, Any]:
        self.sim_time += stats.sim_time_s
        row = {
            "round": stats.round,
            "accuracy": _finite_or_none(accuracy),
            "loss": _finite_or_none(loss),
            "train_loss": _finite_or_none(stats.train_loss),
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "overhead_up": stats.total_overhead_up,
            "overhead_down": stats.total_overhead_down,
            "num_clients": len(stats.clients),
            "failures": len(stats.failures),
            "skipped": stats.skipped,
            "round_sim_time_s": stats.sim_time_s,
            "sim_time_s": self.sim_time,
            "wall_time_s": time.perf_counter() - self.t0,
        }
        self.rows.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()
        full = {**row, "clients": stats.per_client(), "failed": stats.failure_list()}
        self._client_rows.append(full)
        self._jsonl.write(json.dumps(full, allow_nan=False) + "\n")
        self._jsonl.flush()
        return row

    def reached(self, target: float) -> dict[str, Any] | None:
        """The first evaluated round at or above ``target``, with the time and bytes spent until then."""
        up = down = 0
        for r in self.rows:
            up, down = up + r["bytes_up"], down + r["bytes_down"]
            if r["accuracy"] is not None and r["accuracy"] >= target:
                return {"round": r["round"], "sim_time_s": r["sim_time_s"], "wall_time_s": r["wall_time_s"], "bytes_up": up, "bytes_down": down}
        return None

    def finish(self, initial_accuracy: float | None = None) -> dict[str, Any]:
        self._jsonl.close()
        self._csv_file.close()
        evaluated = [r for r in self.rows if r["accuracy"] is not None]
        best = max(evaluated, key=lambda r: r["accuracy"], default=None)
        targets = sorted(set(DEFAULT_TARGETS) | ({self.target} if self.target is not None else set()))
        summary: dict[str, Any] = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "rounds": len(self.rows),
            "initial_accuracy": _finite_or_none(initial_accuracy),
            "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
            "best_accuracy": best["accuracy"] if best else None,
            "best_round": best["round"] if best else None,
            "total_bytes_up": sum(r["bytes_up"] for r in self.rows),
            "total_bytes_down": sum(r["bytes_down"] for r in self.rows),
            "total_overhead_up": sum(r["overhead_up"] for r in self.rows),
            "total_overhead_down": sum(r["overhead_down"] for r in self.rows),
            "failures": sum(r["failures"] for r in self.rows),
            "skipped_rounds": sum(r["skipped"] for r in self.rows),
            "sim_time_s": self.sim_time,
            "wall_time_s": time.perf_counter() - self.t0,
            "target_accuracy": self.target,
            "time_to_accuracy": {f"{t:g}": self.reached(t) for t in targets},
        }
        if self.dense_bytes is not None:
            summary["dense_payload_bytes"] = self.dense_bytes
            summary.update(compression_ratios(self._client_rows, self.dense_bytes))
        if self.target is not None:
            summary["target_reached"] = self.reached(self.target)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        plot_accuracy_vs_time(evaluated, self.out / "accuracy_vs_time.png")
        return summary


def plot_accuracy_vs_time(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against simulated time (and rounds on a second axis) for one run."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([r["sim_time_s"] for r in rows], [r["accuracy"] for r in rows], marker=".")
    ax.set(xlabel="simulated time (s)", ylabel="test accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
