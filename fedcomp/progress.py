"""A rich progress bar showing round, accuracy and bytes moved."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class RoundProgress:
    def __init__(self, num_rounds: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.up = self.down = 0
        self.acc: float | None = None
        self._progress = Progress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not enabled,
        )
        self._task = self._progress.add_task("rounds", total=num_rounds, status="")

    def __enter__(self) -> "RoundProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        self.up += row["bytes_up"]
        self.down += row["bytes_down"]
        if row["accuracy"] is not None:
            self.acc = row["accuracy"]
        acc = "-" if self.acc is None else f"{self.acc:.4f}"
        self._progress.update(
            self._task, advance=1,
            status=f"acc {acc}  up {human_bytes(self.up)}  down {human_bytes(self.down)}",
        )
