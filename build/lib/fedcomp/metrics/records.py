"""Plain records of what happened in a round, filled by the strategy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ClientRound:
    """One sampled client's share of a round. Byte counts are payload lengths (with their
    integrity tags); ``overhead_*`` is the rest of the serialised messages (config, metrics,
    record names)."""

    partition_id: int
    bytes_up: int
    bytes_down: int
    num_examples: int
    train_loss: float
    compute_s: float  # simulated (network.compute) compute time
    ratio: float | None = None  # the sparsification ratio a controller gave this client
    # ||local update||^2 / (lr x local steps)^2: the squared norm of the mean local gradient
    grad_sq_norm: float = float("nan")
    overhead_up: int = 0
    overhead_down: int = 0
    finish_s: float = 0.0  # when its upload arrived, seconds after the round started
    staleness: int = 0  # async: server versions between the model it trained on and its aggregation


@dataclass(frozen=True)
class Failure:
    """A sampled client that contributed nothing to the round, and why."""

    partition_id: int
    reason: str
    bytes_down: int = 0  # what the server had sent it (counted in the round's traffic)
    bytes_up: int = 0  # what it sent back, if anything arrived


@dataclass
class RoundStats:
    round: int
    clients: list[ClientRound] = field(default_factory=list)  # aggregated into the model
    failures: list[Failure] = field(default_factory=list)
    sim_time_s: float = 0.0
    overhead_up: int = 0  # control traffic outside client rounds (queries)
    overhead_down: int = 0
    skipped: bool = False  # too few usable replies: the model did not move

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up for c in self.clients) + sum(f.bytes_up for f in self.failures)

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.clients) + sum(f.bytes_down for f in self.failures)

    @property
    def total_overhead_up(self) -> int:
        return self.overhead_up + sum(c.overhead_up for c in self.clients)

    @property
    def total_overhead_down(self) -> int:
        return self.overhead_down + sum(c.overhead_down for c in self.clients)

    def _weighted_mean(self, values: list[float]) -> float:
        n = sum(c.num_examples for c in self.clients)
        return sum(v * c.num_examples for v, c in zip(values, self.clients)) / n if n else float("nan")

    @property
    def train_loss(self) -> float:
        return self._weighted_mean([c.train_loss for c in self.clients])

    @property
    def grad_sq_norm(self) -> float:
        return self._weighted_mean([c.grad_sq_norm for c in self.clients])

    def per_client(self) -> dict[str, dict]:
        return {str(c.partition_id): {k: _json_number(v) for k, v in asdict(c).items() if k != "partition_id"} for c in self.clients}

    def failure_list(self) -> list[dict]:
        return [asdict(f) for f in self.failures]


def _json_number(v):
    """JSON has no NaN/Inf: such values are written as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
