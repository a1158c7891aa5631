"""Plain records of what happened in a round, filled by the strategy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ClientRound:
    """One sampled client's share of a round. Byte counts are payload lengths."""

    partition_id: int
    bytes_up: int
    bytes_down: int
    num_examples: int
    train_loss: float
    compute_s: float
    ratio: float | None = None  # the sparsification ratio a controller gave this client
    # ||local update||^2 / (lr x local steps)^2: the squared norm of the mean local gradient
    grad_sq_norm: float = float("nan")


@dataclass
class RoundStats:
    round: int
    clients: list[ClientRound] = field(default_factory=list)
    sim_time_s: float = 0.0

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up for c in self.clients)

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.clients)

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
        return {str(c.partition_id): {k: v for k, v in asdict(c).items() if k != "partition_id"} for c in self.clients}
