"""DAGC's compression-ratio allocation (Lu et al., 000_12fcf622a7f09c7c.txt, Sec. IV-C to IV-E).

Worker i holds a fraction p_i of the data and sends a fraction delta_i of its gradient. Under
the budget sum_i delta_i = n * mean_ratio, the convergence of D-EF-SGD is governed by

    Phi(delta) = sum_i p_i / sqrt(delta_i) / sqrt(min_i delta_i)            (Sec. IV-C)

``method="paper"`` is Algorithm 2 with Theorem 4's closed forms. ``method="exact"`` is the
true minimiser of Phi under the budget and 0 < delta_i <= 1. Algorithm 2 is not always
optimal: Lemma 4's proportional allocation assumes only worker j sits at delta_min, while at
the optimum several of the smallest workers may share it (for p = [0.5, 0.3, 0.15, 0.05] and
mean ratio 1% Algorithm 2 gives Phi = 112.4, uniform ratios give 100).
"""

from __future__ import annotations

import numpy as np


def dagc_phi(weights: np.ndarray, deltas: np.ndarray) -> float:
    """Phi(delta_1..delta_n) of Sec. IV-C (weights normalised to sum 1)."""
    p = _normalise(weights)
    d = np.asarray(deltas, dtype=np.float64)
    return float((p / np.sqrt(d)).sum() / np.sqrt(d.min()))


def _normalise(weights: np.ndarray) -> np.ndarray:
    p = np.asarray(weights, dtype=np.float64).reshape(-1)
    if p.size == 0 or np.any(~np.isfinite(p)) or np.any(p <= 0):
        raise ValueError("weights must be a non-empty vector of positive numbers")
    return p / p.sum()


def _paper_sorted(p: np.ndarray, budget: float) -> np.ndarray:
    """Algorithm 2 on weights sorted in descending order (O(n))."""
    n = len(p)
    if n == 1:
        return np.array([budget])
    q = p ** (2 / 3)
    total = q.sum()
    best_phi, best_j = np.inf, n - 1
    for j in range(n - 1, -1, -1):  # j = n, n-1, ..., 1 in the paper's 1-based numbering
        if j != n - 1 and j + 1 < n and p[j] == p[j + 1]:
            continue  # duplicate weight: same phi as the worker after it (Algorithm 2, line 6)
        ref = n - 2 if j == n - 1 else n - 1  # (5) uses p_{n-1}, (4) uses p_n
        big_q = (total - q[j]) / q[ref]
        phi = (p[j] * (1 + big_q) + p[ref] * big_q * (1 + big_q)) / budget
        if phi < best_phi:
            best_phi, best_j = phi, j
    ref = n - 2 if best_j == n - 1 else n - 1
    big_q = (total - q[best_j]) / q[ref]
    d_min = budget / (big_q + 1)
    deltas = d_min * q / q[ref]
    deltas[best_j] = d_min
    return deltas


def _exact_sorted(p: np.ndarray, budget: float, fixed: float = 0.0) -> np.ndarray:
    """Minimise (fixed + sum_i p_i / sqrt(d_i)) / sqrt(min d) s.t. sum d = budget, on weights
    sorted in descending order. At the optimum the m smallest workers share t = min d and the
    others follow Lemma 4 (d_i proportional to p_i^(2/3)); search m, then t on its interval."""
    from scipy.optimize import minimize_scalar  # scipy.optimize takes ~1 s to import; only this needs it

    n = len(p)
    q = p ** (2 / 3)
    best_phi, best = np.inf, None
    for m in range(1, n + 1):
        head_q = q[: n - m].sum()
        tail_p = p[n - m :].sum()

        def phi(t: float) -> float:
            rest = budget - m * t
            head = head_q ** 1.5 / np.sqrt(rest) if n - m else 0.0
            return (fixed + tail_p / np.sqrt(t) + head) / np.sqrt(t)

        if m == n:
            t_max = budget / n
        else:  # the smallest of the head must not fall below t
            t_max = budget * q[n - m - 1] / (head_q + m * q[n - m - 1])
        res = minimize_scalar(phi, bounds=(t_max * 1e-9, t_max), method="bounded", options={"xatol": t_max * 1e-12})
        t = float(res.x) if phi(res.x) < phi(t_max) else t_max
        if phi(t) < best_phi:
            best_phi = phi(t)
            d = np.full(n, t)
            if m < n:
                d[: n - m] = (budget - m * t) * q[: n - m] / head_q
            best = d
    return best


def _cap_proportional(d: np.ndarray) -> np.ndarray:
    """Cap ratios at 1 and hand the excess to the others in proportion to their ratios,
    repeating until nothing exceeds 1 (the sum is kept)."""
    d = d.copy()
    budget = d.sum()
    capped = np.zeros(len(d), dtype=bool)
    while (d > 1 + 1e-12).any():
        capped |= d > 1
        d[capped] = 1.0
        d[~capped] *= (budget - capped.sum()) / d[~capped].sum()
    return np.minimum(d, 1.0)


def _with_cap(p: np.ndarray, budget: float, method: str) -> np.ndarray:
    """delta_i <= 1. ``paper`` (Algorithm 2 has no such constraint) caps proportionally;
    ``exact`` re-solves with the capped workers fixed at 1."""
    n = len(p)
    if budget >= n:
        return np.ones(n)
    if method == "paper":
        return _cap_proportional(_paper_sorted(p, budget))
    capped = np.zeros(n, dtype=bool)
    while True:
        d = np.ones(n)
        d[~capped] = _exact_sorted(p[~capped], budget - capped.sum(), fixed=p[capped].sum())
        over = d > 1 + 1e-12
        if not over.any():
            return np.minimum(d, 1.0)
        capped |= over


def dagc_ratios(weights: np.ndarray, mean_ratio: float, method: str = "paper") -> np.ndarray:
    """Per-worker compression ratios delta_i, in the caller's order, with
    sum(delta) = n * mean_ratio and 0 < delta_i <= 1.

    weights: data-volume fractions p_i (normalised if they do not sum to 1); any order, equal
    weights allowed. method: "paper" (Algorithm 2 / Theorem 4) or "exact" (true minimiser).
    """
    if not 0 < mean_ratio <= 1:
        raise ValueError(f"mean_ratio must be in (0, 1], got {mean_ratio}")
    if method not in ("paper", "exact"):
        raise ValueError(f"method must be 'paper' or 'exact', got {method!r}")
    p = _normalise(weights)
    order = np.argsort(-p, kind="stable")
    sorted_deltas = _with_cap(p[order], len(p) * mean_ratio, method)
    deltas = np.empty_like(sorted_deltas)
    deltas[order] = sorted_deltas
    return deltas


def rescale_ratios(deltas: np.ndarray, old_mean: float, new_mean: float) -> np.ndarray:
    """Sec. IV-E: reuse ratios for a new mean, delta_i * new / old (capped at 1 as above)."""
    if not 0 < new_mean <= 1:
        raise ValueError(f"new mean ratio must be in (0, 1], got {new_mean}")
    return _cap_proportional(np.asarray(deltas, dtype=np.float64) * (new_mean / old_mean))
