"""CAT: communication-aware adaptive tuning of the sparsity budget (001_... Sec. 2-5).

Each call picks T maximising Improvement(T) / C(T) (Eq. 7) for the vector it is given, then
compresses with that T:

  ``sparsification``  Improvement = alpha(T) = ||top_T(g)||^2 / ||g||^2 (Lemma 1, Eq. 8);
                      values fp32, payload P(T) = T (ceil(log2 d) + FPP)            (Eq. 5)
  ``sq``              Improvement = beta(T) = (sum_{top T} |g_j|)^2 / (T ||g||^2) (Lemma 3);
                      sent as S+Q (Eq. 3) with Lemma 3's step folded in: each kept coordinate
                      is ||g|| sqrt(beta(T)) / sqrt(T) sign(g_j) = mean_{top T}|g_j| sign(g_j);
                      payload P(T) = FPP + T ceil(log2 d)
  ``stochastic``      Improvement = omega(T) = ||g||^2 / sum_j g_j^2 / p*_j(T) (Lemma 4) with
                      App. F's optimal probabilities; values g_j / p_j; payload as sparsification

Cost models C(T): ``payload`` (bits, P(T)), ``affine`` (c1 P(T) + c0) and ``packet``
(c1 ceil(P(T) / P_max) + c0, Eq. 6). With ``uplink_mbps`` and ``latency_ms`` (interpolated from
the network config) c1 and c0 are seconds -- 1/bandwidth per bit (per packet: its payload plus
``packet_overhead_bits``) and the latency -- so CAT optimises the time the bandwidth model
charges. Search: alpha and beta need the magnitudes in decreasing order only as far as the
optimum, so the top-m are taken with torch.topk, doubling m until the efficiency has turned
down (quasi-concave: Proposition 1; packet model in steps of tau_max). omega(T) costs O(d) per
T; its integer optimum is found by ternary search, which assumes unimodality (omega is
increasing, Lemma 5; C is affine) -- an assumption, not a theorem. ``recompute_every`` = S
keeps T for S calls between searches (App. H).
"""

from __future__ import annotations

import math

import torch

from fedcomp.compression.quantizers import Float32Values, ScaledSign
from fedcomp.compression.recipes import Recipe
from fedcomp.compression.registry import register
from fedcomp.compression.selectors import optimal_probabilities

KINDS = ("sparsification", "sq", "stochastic")
COSTS = ("payload", "affine", "packet")


class CostModel:
    def __init__(self, kind: str, fpp: int, d: int, cost: str, c0: float, c1: float, packet_bits: int) -> None:
        self.index_bits = max(1, math.ceil(math.log2(max(d, 2))))
        self.kind, self.fpp, self.cost, self.c0, self.c1, self.packet_bits = kind, fpp, cost, c0, c1, packet_bits

    def payload_bits(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "sq":
            return self.fpp + t * self.index_bits
        return t * (self.index_bits + self.fpp)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        p = self.payload_bits(t.double())
        if self.cost == "payload":
            return p
        if self.cost == "affine":
            return self.c1 * p + self.c0
        return self.c1 * torch.ceil(p / self.packet_bits) + self.c0

    @property
    def tau_max(self) -> int:
        """Coordinates per packet (Proposition 1); 1 outside the packet model."""
        if self.cost != "packet":
            return 1
        return max(1, self.packet_bits // (self.index_bits + (0 if self.kind == "sq" else self.fpp)))


def _improvement(kind: str, top: torch.Tensor, norm2: float, t: torch.Tensor) -> torch.Tensor:
    if kind == "sparsification":
        return torch.cumsum(top**2, 0)[t - 1] / norm2
    return torch.cumsum(top, 0)[t - 1] ** 2 / (t * norm2)


def best_budget(g: torch.Tensor, kind: str, cost: CostModel) -> int:
    """argmax_T Improvement(T) / C(T) for T in [1, d] (multiples of tau_max for packets)."""
    d = g.numel()
    a = g.abs().double()
    norm2 = float((a * a).sum())
    if d == 0 or norm2 == 0:
        return min(1, d)
    if kind == "stochastic":
        return _ternary_search(lambda t: _omega(g, t, norm2) / float(cost(torch.tensor(float(t)))), 1, d)
    tau = cost.tau_max
    m = min(d, max(64, 4 * tau))
    while True:
        top = torch.topk(a, m, sorted=True).values
        t = torch.arange(tau, m + 1, tau) if tau <= m else torch.zeros(0, dtype=torch.long)
        if t.numel() == 0 or t[-1] != m:
            t = torch.cat([t, torch.tensor([m])])
        eff = _improvement(kind, top, norm2, t) / cost(t)
        i = int(torch.argmax(eff))
        # The optimum is interior once efficiency has fallen after it; else look further.
        if m == d or i < len(t) - 1:
            return int(t[i])
        m = min(d, 2 * m)


def _omega(g: torch.Tensor, t: int, norm2: float) -> float:
    p = optimal_probabilities(g, float(t))
    nz = p > 0
    return norm2 / float((g[nz].double() ** 2 / p[nz]).sum())


def _ternary_search(f, lo: int, hi: int) -> int:
    while hi - lo > 2:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if f(m1) < f(m2):
            lo = m1 + 1
        else:
            hi = m2
    return max(range(lo, hi + 1), key=f)


class _CATSelector:
    def __init__(self, kind: str, cost_args: dict, recompute_every: int) -> None:
        self.kind, self.cost_args, self.recompute_every = kind, cost_args, recompute_every
        self.calls, self.t = 0, None
        self.last_budget = 0

    def select(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t is None or self.calls % self.recompute_every == 0:
            self.t = best_budget(x, self.kind, CostModel(d=x.numel(), **self.cost_args))
        self.calls += 1
        self.last_budget = t = min(self.t, x.numel())
        if self.kind == "stochastic":
            p = optimal_probabilities(x, float(t))
            keep = torch.rand(x.numel(), generator=generator, dtype=torch.float64) < p
            idx = torch.nonzero(keep).reshape(-1)
            return idx, (x[idx].double() / p[idx]).float()
        idx = torch.topk(x.abs(), t, sorted=False).indices.sort().values
        return idx, x[idx]


@register("cat")
class CAT(Recipe):
    def __init__(
        self, kind: str = "sparsification", cost: str = "packet", fpp: int = 32,
        c0: float | None = None, c1: float | None = None, packet_bits: int = 1472 * 8,
        packet_overhead_bits: int = 54 * 8, uplink_mbps: float | None = None, latency_ms: float | None = None,
        recompute_every: int = 1, seed: int = 0,
    ) -> None:
        if kind not in KINDS or cost not in COSTS:
            raise ValueError(f"kind must be one of {KINDS} and cost one of {COSTS}")
        if c1 is None:  # from the link: seconds per payload bit, or per packet
            bits = 1.0 if cost != "packet" else packet_bits + packet_overhead_bits
            c1 = bits / (uplink_mbps * 1e6) if uplink_mbps else bits
        if c0 is None:
            c0 = latency_ms / 1e3 if latency_ms is not None else (packet_overhead_bits if cost == "affine" else 0.0)
        cost_args = dict(kind=kind, fpp=fpp, cost=cost, c0=c0, c1=c1, packet_bits=packet_bits)
        values = ScaledSign("mean_abs") if kind == "sq" else Float32Values()
        super().__init__(_CATSelector(kind, cost_args, recompute_every), values, seed)
        self.kind = kind
