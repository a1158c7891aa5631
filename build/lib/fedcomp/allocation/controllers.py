"""Ratio controllers: the sparsification ratio each sampled client uses in a round.

``RatioController.ratios(server_round, clients, history) -> {partition id: ratio}``. The
strategy asks its controller every round, puts each client's ratio in that client's train
message (``config["ratio"]``) and the client sets it on its uplink compressor before
compressing (``Compressor.set_ratio``). The chosen ratios are recorded per client in
metrics.jsonl (``ratio``), so budgets are checked by the accounting, not assumed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from fedcomp.allocation.adaptopk import adaptopk_ratio, fit_alpha_beta, lemma_t_hat, log_contraction
from fedcomp.allocation.dagc import dagc_ratios


@dataclass
class History:
    """What a controller may look at: the data weights of all clients and, per finished
    round, the norm of the aggregated update and the data-weighted mean of the clients'
    squared local gradient norms (||local update||^2 / (lr x local steps)^2, reported by
    the clients before compression)."""

    weights: np.ndarray
    update_norms: list[float] = field(default_factory=list)
    grad_sq_norms: list[float] = field(default_factory=list)


class RatioController(ABC):
    @abstractmethod
    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]: ...

    def state(self) -> dict:
        """What the controller has learnt so far (JSON values; checkpoints)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


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

    def state(self) -> dict:
        return {"critical": self._critical}

    def load_state(self, state: dict) -> None:
        self._critical = bool(state.get("critical", True))


class AdapTopK(RatioController):
    """AdapTop-K (002_... Algorithms 1 and 2): (1 + gamma) k outside and (1 - gamma) k inside
    [t_hat/2, (t_hat + T)/2). ``t_hat``: a number of rounds, None for T/2, or "lemma" for
    Lemma 3 (``error_compensation`` false) / Lemma 8 (true) with alpha and beta fitted to the
    clients' squared gradient norms of the first ``estimate_rounds`` rounds (those rounds use
    (1 + gamma) k, as the schedule's first segment does) and the given strong-convexity
    constant ``mu`` and learning rate ``lr``. The lemma's t_hat is clamped to
    [2 estimate_rounds, T] so that the schedule stays consistent with the rounds already sent
    and the (1 - gamma) window fits in the horizon, which keeps the total budget equal to
    fixed top-k's."""

    def __init__(
        self, ratio: float, gamma: float, total_rounds: int, t_hat: float | str | None = None, *,
        mu: float = 0.01, lr: float = 0.1, error_compensation: bool = True, estimate_rounds: int = 20,
    ) -> None:
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if isinstance(t_hat, str) and t_hat != "lemma":
            raise ValueError(f"t_hat must be a number of rounds, null or 'lemma', got {t_hat!r}")
        self.ratio, self.gamma, self.total_rounds = ratio, gamma, total_rounds
        estimate = t_hat == "lemma"
        if estimate:
            if not 2 <= estimate_rounds <= total_rounds // 2:
                raise ValueError(f"estimate_rounds must be in [2, T/2], got {estimate_rounds}")
            self.log_b = log_contraction(lr, mu, ratio, error_compensation)
        self.estimate_rounds = estimate_rounds
        self.t_hat: float | None = None if estimate else (total_rounds / 2 if t_hat is None else float(t_hat))
        self.fit: tuple[float, float] | None = None  # (alpha, beta) once estimated

    def ratios(self, server_round: int, clients: list[int], history: History) -> dict[int, float]:
        if self.t_hat is None and len(history.grad_sq_norms) >= self.estimate_rounds:
            self.fit = fit_alpha_beta(history.grad_sq_norms[: self.estimate_rounds])
            lemma = lemma_t_hat(*self.fit, self.log_b)
            self.t_hat = float(min(max(lemma, 2 * self.estimate_rounds), self.total_rounds))
        t_hat = math.inf if self.t_hat is None else self.t_hat  # still estimating: first segment
        r = adaptopk_ratio(server_round, self.ratio, self.gamma, t_hat, self.total_rounds)
        return {c: r for c in clients}

    def state(self) -> dict:
        return {"t_hat": self.t_hat, "fit": list(self.fit) if self.fit is not None else None}

    def load_state(self, state: dict) -> None:
        self.t_hat = state.get("t_hat", self.t_hat)
        self.fit = tuple(state["fit"]) if state.get("fit") is not None else None
