"""Round policies: which clients a round waits for and aggregates (``strategy.round``).

  ``sync``        sample K = fraction x clients, wait for every reply, aggregate all
  ``deadline``    sample K; the round ends ``deadline_s`` after it starts; an upload arriving
                  later is dropped and its update discarded
  ``overcommit``  sample ceil(overcommit x K) and aggregate the first K uploads to arrive
                  (FedScale); the rest are dropped
  ``async``       FedBuff (Nguyen et al. 2022): ``concurrency`` clients train at once on the
                  model current when they started; the server applies an update every
                  ``buffer_size`` arrivals, each scaled by 1 / sqrt(1 + staleness), and drops
                  arrivals more than ``max_staleness`` versions old (see CompressedFedAvg)

A dropped client's upload was sent, so its bytes are counted; its update is not aggregated.
It trained and compressed as usual, so its error-feedback memory keeps the residual of what
it sent: the discarded part is lost to it (the client cannot know). Its downlink was
received, so its model replica (``downlink: update``, HGC) is in sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
ROUND_POLICIES = ("sync", "deadline", "overcommit", "async")


@dataclass(frozen=True)
class Selection(Generic[T]):
    accepted: list[tuple[float, T]]
    late: list[tuple[float, T]]
    ends_by: float | None  # the round cannot end before this (a deadline that expired)


@dataclass(frozen=True)
class RoundPolicy:
    kind: str = "sync"
    deadline_s: float | None = None
    overcommit: float = 1.3
    buffer_size: int = 10
    max_staleness: int = 5
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROUND_POLICIES:
            raise ValueError(f"round must be one of {ROUND_POLICIES}, got {self.kind!r}")
        if self.kind == "deadline" and not (self.deadline_s and self.deadline_s > 0):
            raise ValueError("round=deadline needs deadline_s > 0")
        if self.overcommit < 1:
            raise ValueError(f"overcommit must be >= 1, got {self.overcommit}")
        if self.buffer_size < 1 or self.max_staleness < 0:
            raise ValueError("buffer_size must be >= 1 and max_staleness >= 0")

    def cohort(self, k: int, available: int) -> int:
        """How many clients to sample for a round that needs k."""
        want = math.ceil(self.overcommit * k) if self.kind == "overcommit" else k
        return min(max(want, 1), available)

    def select(self, arrivals: list[tuple[float, T]], k: int, t0: float) -> Selection[T]:
        """Split (arrival time, client) pairs into those aggregated and those dropped."""
        ordered = sorted(arrivals, key=lambda a: a[0])
        if self.kind == "deadline":
            end = t0 + self.deadline_s
            accepted = [a for a in ordered if a[0] <= end]
            late = [a for a in ordered if a[0] > end]
            return Selection(accepted, late, end if late else None)
        if self.kind == "overcommit":
            return Selection(ordered[:k], ordered[k:], None)
        return Selection(ordered, [], None)

    @staticmethod
    def staleness_weight(staleness: int) -> float:
        """FedBuff's 1 / sqrt(1 + s)."""
        return 1.0 / math.sqrt(1.0 + staleness)
