"""Step learning-rate schedule shared by the server (which sends each round's rate) and configs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """lr x gamma^(number of steps passed); steps are rounds (HGC: 50% and 75% of training)."""

    base: float
    step_rounds: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_config(cls, train, num_rounds: int) -> "LRSchedule":
        steps = tuple(sorted(max(1, round(f * num_rounds)) + 1 for f in train.lr_milestones))
        return cls(train.lr, steps, train.lr_gamma)

    def lr(self, server_round: int) -> float:
        return self.base * self.gamma ** sum(server_round >= s for s in self.step_rounds)
