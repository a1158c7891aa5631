"""AdapTop-K's schedule and its switch point t_hat (002_..., Sec. 4 and 5).

Lemma 2 / Lemma 7 bound the squared stochastic gradient norm by alpha / t + beta. The weight of
round t in the bound of Eq. (18) / (33) is A_t B_t with A_t = alpha / t + beta and
B_t = B^(T-1-t); Lemma 3 / 8 show it falls until t_hat and rises after, with

    t_hat = floor((-alpha + sqrt(Delta)) / (2 beta)),  Delta = alpha^2 - 4 alpha beta / ln B,

B = 1 - eta mu k / d without error compensation (Lemma 3) and B = 1 - eta mu / 2 with it
(Lemma 8). alpha and beta are not observable directly; ``fit_alpha_beta`` estimates them from
measured squared gradient norms of the first rounds by least squares on the model
alpha / t + beta. Only their ratio matters: scaling both leaves t_hat unchanged, so the d/k
factor of Lemma 2 need not be known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def adaptopk_ratio(server_round: int, ratio: float, gamma: float, t_hat: float, total_rounds: int) -> float:
    """Eq. (21) / (36): (1 - gamma) k inside [t_hat/2, (t_hat + T)/2) and (1 + gamma) k outside.
    The inside window is T/2 rounds long, so over T rounds the total equals fixed top-k's
    (exactly when T is even)."""
    t = server_round - 1  # the paper counts iterations from 0
    inside = t_hat / 2 <= t < (t_hat + total_rounds) / 2
    return min(1.0, ratio * (1 - gamma if inside else 1 + gamma))


def log_contraction(lr: float, mu: float, ratio: float, error_compensation: bool) -> float:
    """ln B: B = 1 - eta mu / 2 with error compensation (Lemma 8), else 1 - eta mu k/d (Lemma 3)."""
    b = 1 - lr * mu / 2 if error_compensation else 1 - lr * mu * ratio
    if not 0 < b < 1:
        raise ValueError(f"B = {b} must lie in (0, 1): need 0 < eta mu < 2 (eta={lr}, mu={mu})")
    return math.log(b)


def lemma_t_hat(alpha: float, beta: float, log_b: float) -> float:
    """Lemma 3 / 8: the round where A_t B_t stops falling. Infinite when beta = 0 (the bound
    keeps falling like 1 / t, so the minimum lies beyond any horizon)."""
    if alpha < 0 or beta < 0 or log_b >= 0:
        raise ValueError(f"need alpha, beta >= 0 and ln B < 0 (got {alpha}, {beta}, {log_b})")
    if beta == 0:
        return math.inf
    delta = alpha * alpha - 4 * alpha * beta / log_b
    return float(math.floor((-alpha + math.sqrt(delta)) / (2 * beta)))


def fit_alpha_beta(sq_norms: Sequence[float]) -> tuple[float, float]:
    """Least-squares alpha, beta >= 0 of sq_norms[t-1] ~ alpha / t + beta for t = 1, 2, ...
    (the form of Lemma 2 / 7). A negative unconstrained coefficient is set to 0 and the other
    refitted alone."""
    y = np.asarray(sq_norms, dtype=float)
    if len(y) < 2:
        raise ValueError("need squared gradient norms of at least 2 rounds")
    x = 1.0 / np.arange(1, len(y) + 1)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    if alpha < 0:
        return 0.0, max(float(y.mean()), 0.0)
    if beta < 0:
        return max(float(x @ y / (x @ x)), 0.0), 0.0
    return float(alpha), float(beta)
