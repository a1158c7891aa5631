"""Writes metrics.jsonl / metrics.csv per round, partition.json once, summary.json at the end."""

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
    "round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "num_clients",
    "round_sim_time_s", "sim_time_s", "wall_time_s",
)


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
            "accuracy": accuracy,
            "loss": loss,
            "train_loss": _finite_or_none(stats.train_loss),
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "num_clients": len(stats.clients),
            "round_sim_time_s": stats.sim_time_s,
            "sim_time_s": self.sim_time,
            "wall_time_s": time.perf_counter() - self.t0,
        }
        self.rows.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()
        full = {**row, "clients": stats.per_client()}
        self._client_rows.append(full)
        self._jsonl.write(json.dumps(full) + "\n")
        self._jsonl.flush()
        return row

    def finish(self, initial_accuracy: float | None = None) -> dict[str, Any]:
        self._jsonl.close()
        self._csv_file.close()
        evaluated = [r for r in self.rows if r["accuracy"] is not None]
        best = max(evaluated, key=lambda r: r["accuracy"], default=None)
        summary: dict[str, Any] = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "rounds": len(self.rows),
            "initial_accuracy": initial_accuracy,
            "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
            "best_accuracy": best["accuracy"] if best else None,
            "best_round": best["round"] if best else None,
            "total_bytes_up": sum(r["bytes_up"] for r in self.rows),
            "total_bytes_down": sum(r["bytes_down"] for r in self.rows),
            "sim_time_s": self.sim_time,
            "wall_time_s": time.perf_counter() - self.t0,
            "target_accuracy": self.target,
        }
        if self.dense_bytes is not None:
            summary["dense_payload_bytes"] = self.dense_bytes
            summary.update(compression_ratios(self._client_rows, self.dense_bytes))
        if self.target is not None:
            hit = next((r for r in evaluated if r["accuracy"] >= self.target), None)
            summary["target_reached"] = {
                "round": hit["round"],
                "sim_time_s": hit["sim_time_s"],
                "wall_time_s": hit["wall_time_s"],
                "bytes_up": sum(r["bytes_up"] for r in self.rows if r["round"] <= hit["round"]),
                "bytes_down": sum(r["bytes_down"] for r in self.rows if r["round"] <= hit["round"]),
            } if hit else None
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
