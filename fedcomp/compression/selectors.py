"""Sparsifiers: which coordinates of a flat vector are sent, and with which values.

Each selector maps a flat float32 vector to (sorted int64 indices, values at those indices),
on the vector's device; ``Dense`` returns no indices (None): its values are the whole vector.
Most send the original values; stochastic sparsification sends g_j / p_j to stay unbiased.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def budget(d: int, ratio: float | None, k: int | None) -> int:
    """Number of coordinates to keep: ``k`` if given, else ``ratio`` x d rounded (>= 1 when
    d > 0 and ratio > 0), never more than d."""
    if (ratio is None) == (k is None):
        raise ValueError("give exactly one of ratio (fraction of d) or k (absolute count)")
    if k is not None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return min(int(k), d)
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return min(d, max(1 if ratio > 0 and d else 0, int(round(ratio * d))))


def top_k_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the ``k`` largest entries of the flat vector ``a``; entries equal to
    the k-th largest go to the lowest indices, so the choice never depends on torch's (device-
    and version-specific) tie order.

    A full ``torch.topk`` over d entries is what made top-k compression cost as much as a
    client's training step (a quarter of a second at d = 11.2M). Here a strided sample of
    about 64 d / k entries gives a threshold a little below the k-th largest; one comparison
    over ``a`` then keeps about 1.25 k candidates, which hold every entry >= the k-th largest
    whenever there are at least k of them (checked; otherwise every entry is a candidate), and
    the exact choice is made among those. On the CPU (float32/64) the same steps run in numpy:
    a client's selection is a dozen small operations, and a torch call costs more than numpy's
    (at d = 159k, k = 1590: 113 us against 160 us, the NaN check included; numpy's comparison
    and flatnonzero alone take a quarter of torch's ``nonzero(a >= t)`` at d = 1.66M)."""
    d = a.numel()
    if k >= d:
        return torch.arange(d, device=a.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=a.device)
    # A max propagates NaN and is a tenth of the cost of isnan(a).any() on the CPU.
    if _in_numpy(a):
        values = a.detach().numpy()
        if not np.isnan(values.max()):
            return torch.from_numpy(_top_k_numpy(values, k))
    elif not bool(torch.isnan(a.amax())):
        return _top_k_torch(a, k)
    # NaN has no order: torch.topk's (NaN first), so NaNs still reach a finiteness check.
    return torch.topk(a, k, sorted=False).indices.sort().values


def _in_numpy(a: torch.Tensor) -> bool:
    """Whether ``a``'s per-client passes run in numpy: CPU float32/64 (see ``top_k_indices``)."""
    return a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)


def magnitudes(x: torch.Tensor) -> torch.Tensor:
    """|x|, by numpy on the CPU (float32/64): one pass without waking torch's thread team. On a
    vector other work has just evicted from the caches (d = 159k), torch's ``abs`` took 109 us
    and numpy's 78 us."""
    return torch.from_numpy(np.abs(x.detach().numpy())) if _in_numpy(x) else x.abs()


def _sample_step(d: int, k: int) -> tuple[int, int]:
    """The strided sample's step, and how many of its largest entries bound the threshold."""
    step = max(1, d // max(1024, math.ceil(64 * d / k)))
    n = -(-d // step)
    return step, min(n, math.ceil(1.25 * k * n / d) + 16)


def _top_k_torch(a: torch.Tensor, k: int) -> torch.Tensor:
    step, j = _sample_step(a.numel(), k)
    candidates = torch.nonzero(a >= torch.topk(a[::step], j, sorted=False).values.min()).reshape(-1)
    if candidates.numel() < k:
        candidates = torch.arange(a.numel(), device=a.device)
    values = a[candidates]
    kth = torch.topk(values, k, sorted=False).values.min()
    above, tied = values > kth, values == kth
    return candidates[above | (tied & (torch.cumsum(tied, 0) <= k - int(above.sum())))]


def _top_k_numpy(a: np.ndarray, k: int) -> np.ndarray:
    """``_top_k_torch``'s steps in numpy: the j-th largest of the sample by partition, not topk."""
    step, j = _sample_step(a.size, k)
    sample = a[::step]
    candidates = np.flatnonzero(a >= np.partition(sample, sample.size - j)[sample.size - j])
    if candidates.size < k:
        candidates = np.arange(a.size)
    values = a[candidates]
    kth = np.partition(values, values.size - k)[values.size - k]
    above, tied = values > kth, values == kth
    return candidates[above | (tied & (np.cumsum(tied) <= k - np.count_nonzero(above)))]


class TopK:
    """The k largest magnitudes (ties at the k-th to the lowest indices)."""

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        budget(1, ratio, k)
        self.ratio, self.k = ratio, k

    def select(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = budget(x.numel(), self.ratio, self.k)
        if k == x.numel():
            idx = torch.arange(k, device=x.device)
        else:
            idx = top_k_indices(magnitudes(x), k)
        return idx, x[idx]


class RandomK:
    """k coordinates drawn uniformly without replacement (values unscaled, as in Dutta et al.)."""

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        budget(1, ratio, k)
        self.ratio, self.k = ratio, k

    def select(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.numel()
        k = budget(d, self.ratio, self.k)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        picked = np.random.default_rng(seed).choice(d, size=k, replace=False) if k else np.zeros(0, np.int64)
        idx = torch.from_numpy(np.sort(picked).astype(np.int64)).to(x.device)
        return idx, x[idx]


class Threshold:
    """Every coordinate with |x_j| >= v (Dutta et al.'s Threshold-v)."""

    def __init__(self, v: float = 1e-3) -> None:
        if v < 0:
            raise ValueError(f"threshold v must be >= 0, got {v}")
        self.v = v

    def select(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(x.abs() >= self.v).reshape(-1)
        return idx, x[idx]


def optimal_probabilities(g: torch.Tensor, budget_t: float) -> torch.Tensor:
    """p* of CAT App. F (Wangni et al.'s water-filling): minimise sum_j g_j^2 / p_j subject to
    sum_j p_j = T and 0 <= p_j <= 1. The n_s largest magnitudes get p = 1; the rest
    p_j = |g_j| (T - n_s) / sum_{i > n_s} |g_i|, with n_s the smallest count that keeps every
    p_j <= 1. Zero coordinates get p = 0."""
    a = magnitudes(g)
    nnz = int(torch.count_nonzero(a))
    if budget_t >= nnz:
        return (a > 0).double()
    # n_s <= ceil(T) (at m >= T the test below holds trivially), so only the largest ceil(T) + 1
    # magnitudes need ordering: a partial selection, then a sort of those alone (ties by index).
    chosen = top_k_indices(a, min(nnz, math.ceil(budget_t) + 1))
    s, order = torch.sort(a[chosen], descending=True, stable=True)
    top_indices = chosen[order]
    s = s.double()
    # tail[m] = sum_{i >= m} s_i, summed from the small end (total minus a prefix would cancel)
    rest = a.index_fill(0, top_indices, 0.0).sum(dtype=torch.float64)
    tail = rest + torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])
    m = torch.arange(len(s), dtype=torch.float64)
    ok = s * (budget_t - m) <= tail  # largest remaining entry fits under 1 once m are saturated
    n_s = int(torch.nonzero(ok)[0])  # ok holds at the last ranked entry, see above
    p = a.double().mul_(budget_t - n_s).div_(tail[n_s]).clamp_(max=1.0)  # in place: d float64s once
    p[top_indices[:n_s]] = 1.0
    return p


class Stochastic:
    """Stochastic sparsification, CAT Eq. 4: keep j with probability p*_j (App. F, sum = T
    on average) and send g_j / p*_j, an unbiased estimate of g."""

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        budget(1, ratio, k)
        self.ratio, self.k = ratio, k

    def select(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # On the CPU whatever the device: p* comes from float64 sums whose rounding depends on
        # the reduction order, and a payload must not depend on where training ran.
        x = x.cpu()
        p = optimal_probabilities(x, budget(x.numel(), self.ratio, self.k))
        keep = torch.rand(x.numel(), generator=generator, dtype=torch.float64) < p
        idx = torch.nonzero(keep).reshape(-1)
        return idx, (x[idx].double() / p[idx]).float()


class Dense:
    """Every coordinate (for quantizers applied to the whole vector)."""

    def select(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[None, torch.Tensor]:
        return None, x  # no positions to send: the values are the whole vector, in order
