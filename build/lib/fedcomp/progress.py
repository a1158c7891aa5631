"""A rich progress bar showing round, accuracy and bytes moved."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class RoundProgress:
    def __init__(self, num_rounds: int, enabled: bool = True, done: int = 0) -> None:
        self.enabled = enabled
        self.terminal = sys.stdout.isatty()
        self.up = self.down = 0
        self.acc: float | None = None
        self._progress = Progress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not (enabled and self.terminal),
        )
        self._task = self._progress.add_task("rounds", total=num_rounds, completed=done, status="")

    def __enter__(self) -> "RoundProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        """Advance the bar (on a terminal) or print one plain line (batch schedulers, pipes)."""
        self.up += row["bytes_up"]
        self.down += row["bytes_down"]
        if row["accuracy"] is not None:
            self.acc = row["accuracy"]
        acc = "-" if self.acc is None else f"{self.acc:.4f}"
        status = f"acc {acc}  up {human_bytes(self.up)}  down {human_bytes(self.down)}"
        if self.enabled and not self.terminal:
            print(f"round {row['round']}: {status}  sim {row['sim_time_s']:.2f} s  failures {row['failures']}", flush=True)
        self._progress.update(self._task, advance=1, status=status)
