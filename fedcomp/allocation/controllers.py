"""Ratio controllers: the sparsification ratio each sampled client uses in a round.

``RatioController.ratios(server_round, clients, history) -> {partition id: ratio}``. The
strategy asks its controller every round, puts each client's ratio in that client's train
message (``config["ratio"]``) and the client sets it on its uplink compressor before
compressing (``Compressor.set_ratio``). The chosen ratios are recorded per client in
metrics.jsonl (``ratio``), so budgets are checked by the accounting, not assumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from fedcomp.allocation.dagc import dagc_ratios


@dataclass
class History:
    """What a controller may look at: the data weights of all clients and, per finished
    round, the norm of the aggregated update."""

    weights: np.ndarray
    update_norms: list[float] = field(default_factory=list)


class RatioController(ABC):
    @abstractmethod
    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]: ...


class Uniform(RatioController):
    """Top-delta: every client the same ratio."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]:
        return {c: self.ratio for c in clients}


class Explicit(RatioController):
    """Fixed per-client ratios (DAGC Sec. III's non-uniform settings I and II)."""

    def __init__(self, per_client: list[float]) -> None:
        self.per_client = list(per_client)

    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]:
        return {c: self.per_client[c] for c in clients}


class DAGC(RatioController):
    """DAGC (000_... Algorithm 2, or the exact optimum): ratios from the data weights, computed
    once for the partition and reused."""

    def __init__(self, mean_ratio: float, method: str = "paper") -> None:
        self.mean_ratio, self.method = mean_ratio, method
        self._deltas: np.ndarray | None = None

    def per_client(self, weights: np.ndarray) -> np.ndarray:
        if self._deltas is None:
            self._deltas = dagc_ratios(weights, self.mean_ratio, self.method)
        return self._deltas

    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]:
        deltas = self.per_client(history.weights)
        return {c: float(deltas[c]) for c in clients}


class Accordion(RatioController):
    """ACCORDION (Agarwal et al. 2021) as DAGC uses it: every ``interval`` rounds compare the
    norm of the update accumulated over the last interval with the one before; a relative
    change of at least ``eta`` marks a critical regime, which gets ``high`` (light compression)
    until the next check, otherwise ``low``. DAGC's comparison takes low and high as the min
    and max of DAGC's ratios."""

    def __init__(self, low: float, high: float, eta: float = 0.5, interval: int = 10) -> None:
        self.low, self.high, self.eta, self.interval = low, high, eta, interval
        self._critical = True  # training starts in a critical regime

    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]:
        norms = history.update_norms
        if server_round > 1 and (server_round - 1) % self.interval == 0 and len(norms) >= 2 * self.interval:
            prev = float(np.sum(norms[-2 * self.interval : -self.interval]))
            cur = float(np.sum(norms[-self.interval :]))
            self._critical = prev > 0 and abs(prev - cur) / prev >= self.eta
        ratio = self.high if self._critical else self.low
        return {c: ratio for c in clients}


def adaptopk_ratio(server_round: int, ratio: float, gamma: float, t_hat: float, total_rounds: int) -> float:
    """AdapTop-K (002_... Eq. 21 / 36): (1 - gamma) k inside [t_hat/2, (t_hat + T)/2) and
    (1 + gamma) k outside. The inside window is T/2 rounds long, so over T rounds the total
    equals fixed top-k's (exactly when T is even)."""
    t = server_round - 1  # the paper counts iterations from 0
    inside = t_hat / 2 <= t < (t_hat + total_rounds) / 2
    return min(1.0, ratio * (1 - gamma if inside else 1 + gamma))


class AdapTopK(RatioController):
    """AdapTop-K with switch point ``t_hat`` (rounds; Lemma 3 / 8 give it from estimates of
    the problem's alpha and beta, which are not observable here, so it is set directly;
    default T/2, the midpoint)."""

    def __init__(self, ratio: float, gamma: float, total_rounds: int, t_hat: float | None = None) -> None:
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        self.ratio, self.gamma, self.total_rounds = ratio, gamma, total_rounds
        self.t_hat = total_rounds / 2 if t_hat is None else t_hat

    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]:
        r = adaptopk_ratio(server_round, self.ratio, self.gamma, self.t_hat, self.total_rounds)
        return {c: r for c in clients}
