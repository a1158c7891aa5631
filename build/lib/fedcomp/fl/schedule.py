"""What the server tells every client about local training each round: the learning rate
(a step schedule) and the local SGD momentum (a ramp).

The server is the single source of both, so strategies can change them (HGC's momentum change
after a learning-rate step, 003_... Sec. 3.2) and every client of a round trains alike.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSchedule:
    """lr = base x gamma^(steps passed), steps at rounds ``lr_steps`` (HGC: 50% and 75% of
    training). Momentum: ``momentum`` until the first entry of ``momentum_ramp``, then the
    value of the last entry (round, momentum) whose round has been reached -- e.g. SOFF's
    0 -> 0.3 -> 0.6 -> 0.9 warm-up of the clients' momentum."""

    base: float
    lr_steps: tuple[int, ...] = ()
    gamma: float = 0.1
    momentum: float = 0.0
    momentum_ramp: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_config(cls, train, num_rounds: int) -> "TrainSchedule":
        steps = tuple(sorted(max(1, round(f * num_rounds)) + 1 for f in train.lr_milestones))
        ramp = tuple(sorted((int(r), float(m)) for r, m in (train.get("momentum_ramp") or ())))
        return cls(train.lr, steps, train.lr_gamma, train.momentum, ramp)

    def lr(self, server_round: int) -> float:
        return self.base * self.gamma ** sum(server_round >= s for s in self.lr_steps)

    def momentum_at(self, server_round: int) -> float:
        reached = [m for r, m in self.momentum_ramp if r <= server_round]
        return reached[-1] if reached else self.momentum
