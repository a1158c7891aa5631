"""Writes metrics.jsonl / metrics.csv per round, partition.json once, summary.json at the end.

Every file is valid JSON / CSV: a non-finite number (a diverged loss) is written as null.
"""

from __future__ import annotations

import csv
import json
import logging
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
log = logging.getLogger("fedcomp")


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


class MetricsRecorder:
    def __init__(self, out_dir: str | Path, cfg: DictConfig, target_accuracy: float | None = None, dense_bytes: int | None = None,
                 resume_after: int = 0) -> None:
        """``resume_after``: keep the records of rounds up to this one from an earlier run in
        ``out_dir`` and continue after them (a resumed run)."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.target = target_accuracy
        self.dense_bytes = dense_bytes
        self._client_rows: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.sim_time = 0.0
        kept = []
        if resume_after:
            kept = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
            kept = [r for r in kept if r["round"] <= resume_after]
        self._jsonl = (self.out / "metrics.jsonl").open("w")
        loggers = set(cfg.get("loggers", ["csv"]))
        self._csv_file = (self.out / "metrics.csv").open("w", newline="") if "csv" in loggers else None
        if self._csv_file is not None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS)
            self._csv.writeheader()
        self._tensorboard = _tensorboard(self.out) if "tensorboard" in loggers else None
        for full in kept:
            self._write({k: v for k, v in full.items() if k not in ("clients", "failed")}, full)
        if kept:
            self.sim_time = kept[-1]["sim_time_s"]
            self.t0 -= kept[-1]["wall_time_s"]

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
        self._write(row, {**row, "clients": stats.per_client(), "failed": stats.failure_list()})
        log.info("round %d: accuracy %s, train loss %s, up %d B, down %d B, failures %d, sim %.3f s", stats.round,
                 "-" if accuracy is None else f"{accuracy:.4f}", row["train_loss"], row["bytes_up"], row["bytes_down"],
                 row["failures"], self.sim_time)
        return row

    def _write(self, row: dict[str, Any], full: dict[str, Any]) -> None:
        self.rows.append(row)
        self._client_rows.append(full)
        if self._csv_file is not None:
            self._csv.writerow(row)
            self._csv_file.flush()
        if self._tensorboard is not None:
            for key in ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "sim_time_s", "failures"):
                if row[key] is not None:
                    self._tensorboard.add_scalar(key, row[key], row["round"])
        self._jsonl.write(json.dumps(full, allow_nan=False) + "\n")
        self._jsonl.flush()

    def reached(self, target: float) -> dict[str, Any] | None:
        """The first evaluated round at or above ``target``, with the time and bytes spent until then."""
        up = down = 0
        for r in self.rows:
            up, down = up + r["bytes_up"], down + r["bytes_down"]
            if r["accuracy"] is not None and r["accuracy"] >= target:
                return {"round": r["round"], "sim_time_s": r["sim_time_s"], "wall_time_s": r["wall_time_s"], "bytes_up": up, "bytes_down": down}
        return None

    def finish(self, initial_accuracy: float | None = None, status: str = "ok", reason: str | None = None,
               resumed_from: int = 0) -> dict[str, Any]:
        """Close the files and write summary.json (``status``: ok, or diverged / stopped with
        ``reason``; ``resumed_from``: the round a resumed run continued after)."""
        self._jsonl.close()
        if self._csv_file is not None:
            self._csv_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        evaluated = [r for r in self.rows if r["accuracy"] is not None]
        best = max(evaluated, key=lambda r: r["accuracy"], default=None)
        targets = sorted(set(DEFAULT_TARGETS) | ({self.target} if self.target is not None else set()))
        summary: dict[str, Any] = {
            "status": status,
            **({"reason": reason} if reason else {}),
            **({"resumed_from": resumed_from} if resumed_from else {}),
            "name": self.cfg.get("name"),
            "tags": list(self.cfg.get("tags") or []),
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


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("loggers=[tensorboard] needs the tensorboard package: pip install 'fedcomp[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))


def write_failure(out_dir: str | Path, cfg: DictConfig, status: str, reason: str) -> None:
    """summary.json for a run that could not finish: its status and reason, the config, and
    the rounds it completed (from metrics.jsonl, if it got that far)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
    summary = {"status": status, "reason": reason, "name": cfg.get("name"), "tags": list(cfg.get("tags") or []),
               "config": OmegaConf.to_container(cfg, resolve=False), "rounds": len(rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))


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
