"""Deep Gradient Compression (Lin et al. 2018) as an uplink compressor.

Per client and round, on the update g it is given:
  local gradient clipping  g <- g * min(1, clip_norm / ||g||)          (if clip_norm is set)
  momentum correction      u <- m u + g;  v <- v + u
  sparsification           send the top-k of |v| (k from the warm-up schedule)
  momentum factor masking  v[sent] <- 0;  u[sent] <- 0
The accumulation v is DGC's error feedback, so do not also wrap it in ``error_feedback``.
Warm-up: the ratio falls exponentially from 25% to ``ratio`` over ``warmup_rounds`` rounds
(``fedcomp.hgc.schedule.warmup_ratio``, the schedule HGC's paper applies to every sparsifier).

Momentum correction *is* DGC's momentum: it replaces the optimizer's. ``momentum`` fixed
(default 0.9) assumes local SGD without momentum (``train.momentum: 0``); ``momentum: null``
takes each round's local momentum from the training schedule (``train.momentum``,
``train.momentum_ramp``) and the client then trains without optimizer momentum, so DGC runs on
the same recipe as methods whose momentum lives in the optimizer. u accumulates updates (lr
already applied), so after a learning-rate step its older terms carry the earlier rate.
"""

from __future__ import annotations

import torch

from fedcomp.compression.quantizers import Float32Values
from fedcomp.compression.recipes import Recipe
from fedcomp.compression.registry import register
from fedcomp.compression.selectors import TopK, budget
from fedcomp.hgc.schedule import warmup_ratio


class _DGCSelector:
    def __init__(self, ratio: float, momentum: float, clip_norm: float | None, warmup_rounds: int) -> None:
        budget(1, ratio, None)
        self.ratio, self.momentum, self.clip_norm, self.warmup_rounds = ratio, momentum, clip_norm, warmup_rounds
        self.round = 1
        self.k = None  # DGC budgets by ratio only
        self.u = torch.zeros(0)
        self.v = torch.zeros(0)

    def select(self, g: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.u.numel() != g.numel():
            self.u, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.u, self.v = self.u.to(g.device), self.v.to(g.device)  # loaded from the client's CPU store
        if self.clip_norm is not None:
            g = g * min(1.0, self.clip_norm / (float(g.norm()) + 1e-12))
        self.u = self.momentum * self.u + g
        self.v = self.v + self.u
        ratio = warmup_ratio(self.round, self.ratio, self.warmup_rounds)
        idx, values = TopK(ratio=ratio).select(self.v)
        values = values.clone()
        self.v[idx] = 0
        self.u[idx] = 0
        return idx, values


@register("dgc")
class DGC(Recipe):
    def __init__(self, ratio: float = 0.001, momentum: float | None = 0.9, clip_norm: float | None = None, warmup_rounds: int = 0) -> None:
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(f"DGC momentum must be in [0, 1) or null, got {momentum}")
        self.follows_schedule = momentum is None
        super().__init__(_DGCSelector(ratio, momentum or 0.0, clip_norm, warmup_rounds), Float32Values())

    def set_round(self, server_round: int) -> None:
        self.selector.round = server_round

    def take_momentum(self, momentum: float) -> bool:
        if self.follows_schedule:
            self.selector.momentum = momentum
        return self.follows_schedule

    def state(self) -> dict[str, torch.Tensor]:
        return {"u": self.selector.u, "v": self.selector.v}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.selector.u = state.get("u", torch.zeros(0))
        self.selector.v = state.get("v", torch.zeros(0))
