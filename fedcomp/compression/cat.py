"""CAT: communication-aware adaptive tuning of the sparsity budget (001_... Sec. 2-5).

Each call picks T maximising Improvement(T) / C(T) (Eq. 7) for the vector it is given, then
compresses with that T and the step of the matching descent lemma folded into the values
(the client's learning rate plays the base step 1/L):

  ``sparsification``  Improvement = alpha(T) = ||top_T(g)||^2 / ||g||^2 (Lemma 1, Eq. 8);
                      step 1/L: values fp32 as they are; payload P(T) = T (ceil(log2 d) + FPP) (Eq. 5)
  ``sq``              Improvement = beta(T) = (sum_{top T} |g_j|)^2 / (T ||g||^2) (Lemma 3);
                      sent as S+Q (Eq. 3) with Lemma 3's step sqrt(beta(T)) / (sqrt(T) L): each
                      kept coordinate is mean_{top T}|g_j| sign(g_j); payload P(T) = FPP + T ceil(log2 d)
  ``stochastic``      Improvement = omega(T) = ||g||^2 / sum_j g_j^2 / p*_j(T) (Lemma 4) with
                      App. F's optimal probabilities; Lemma 4's step omega(T) / L: values
                      omega(T) g_j / p_j; payload as sparsification

Cost models C(T): ``payload`` (bits, P(T)), ``affine`` (c1 P(T) + c0) and ``packet``
(c1 ceil(P(T) / P_max) + c0, Eq. 6). With ``uplink_mbps`` and ``latency_ms`` (interpolated from
the network config) c1 and c0 are seconds -- 1/bandwidth per bit (per packet: its payload plus
``packet_overhead_bits``) and the latency -- so CAT optimises the time the bandwidth model
charges; give c0, c1 (and ``packet_bits`` = P_max) to use the paper's constants instead.

Search. Under the packet model the cost only changes where P(T) crosses a multiple of P_max, so
for an increasing improvement the optimum is the largest T that fits in c packets,
T_c = floor((c P_max - P(0)) / (bits per coordinate)) -- for S+Q, P(0) = FPP is the header
(Proposition 1 with the header subtracted). alpha and omega are increasing (Lemmas 2, 5), so
sparsification and stochastic sparsification search only T_c; beta is not monotone (it rises,
then falls), so S+Q evaluates every T, which is Eq. 9's Step 1 exactly. alpha and beta need the
magnitudes in decreasing order only as far as the optimum, so the top-m are taken with
torch.topk, doubling m until the efficiency has turned down (quasi-concave: Proposition 1).
omega(T) costs O(d) per T; its optimum over T (affine, payload) or over the T_c (packet) is
found by ternary search, which assumes unimodality (omega increasing, C affine or a step
function) -- an assumption, not a theorem. ``recompute_every`` = S keeps T for S calls between
searches (App. H). The paper's CAT has no error feedback (``fedcomp/conf/compressor/cat.yaml``: off;
error feedback would also bias the unbiased stochastic compressor).
"""

from __future__ import annotations

import math

import torch

from fedcomp.compression.quantizers import Float32Values, ScaledSign
from fedcomp.compression.recipes import Recipe
from fedcomp.compression.registry import register
from fedcomp.compression.selectors import magnitudes, optimal_probabilities, top_k_indices

KINDS = ("sparsification", "sq", "stochastic")
COSTS = ("payload", "affine", "packet")


class CostModel:
    def __init__(self, kind: str, fpp: int, d: int, cost: str, c0: float, c1: float, packet_bits: int) -> None:
        self.index_bits = max(1, math.ceil(math.log2(max(d, 2))))
        self.kind, self.fpp, self.cost, self.c0, self.c1, self.packet_bits = kind, fpp, cost, c0, c1, packet_bits
        # P(T) = header + per_coordinate x T (Eq. 5)
        self.header = fpp if kind == "sq" else 0
        self.per_coordinate = self.index_bits + (0 if kind == "sq" else fpp)

    def payload_bits(self, t: torch.Tensor) -> torch.Tensor:
        return self.header + t * self.per_coordinate

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        p = self.payload_bits(t.double())
        if self.cost == "payload":
            return p
        if self.cost == "affine":
            return self.c1 * p + self.c0
        return self.c1 * torch.ceil(p / self.packet_bits) + self.c0

    def packet_budgets(self, d: int) -> torch.Tensor:
        """T_c = floor((c P_max - header) / bits per coordinate) for c = 1, 2, ...: the largest
        budget fitting in c packets (capped at d), increasing; every T in [1, d] otherwise."""
        if self.cost != "packet":
            return torch.arange(1, d + 1)
        packets = torch.arange(1, math.ceil(float(self.payload_bits(torch.tensor(d))) / self.packet_bits) + 1, dtype=torch.float64)
        t = torch.clamp(torch.floor((packets * self.packet_bits - self.header) / self.per_coordinate), max=d).long()
        return torch.unique(t[t >= 1])


def _improvement(kind: str, top: torch.Tensor, norm2: float, t: torch.Tensor) -> torch.Tensor:
    if kind == "sparsification":
        return torch.cumsum(top**2, 0)[t - 1] / norm2
    return torch.cumsum(top, 0)[t - 1] ** 2 / (t * norm2)


def best_budget(g: torch.Tensor, kind: str, cost: CostModel) -> int:
    """argmax_T Improvement(T) / C(T) for T in [1, d] (the T_c of the packet model where the
    improvement is increasing; see the module doc)."""
    d = g.numel()
    a = g.abs().double()
    norm2 = float((a * a).sum())
    if d == 0 or norm2 == 0:
        return min(1, d)
    grid = cost.packet_budgets(d) if kind != "sq" else torch.arange(1, d + 1)
    if kind == "stochastic":
        best = _ternary_search(lambda i: omega(g, int(grid[i]), norm2) / float(cost(grid[i].double())), 0, len(grid) - 1)
        return int(grid[best])
    m = min(d, max(64, 4 * int(grid[0])))
    while True:
        top = torch.topk(a, m, sorted=True).values
        t = grid[grid <= m]
        if t.numel() == 0 or t[-1] != m:
            t = torch.cat([t, torch.tensor([m])])
        eff = _improvement(kind, top, norm2, t) / cost(t)
        i = int(torch.argmax(eff))
        # The optimum is interior once efficiency has fallen after it; else look further.
        if m == d or i < len(t) - 1:
            return int(t[i])
        m = min(d, 2 * m)


def omega(g: torch.Tensor, t: int, norm2: float) -> float:
    """omega(T) of Lemma 4 with App. F's optimal probabilities."""
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
    def __init__(self, kind: str, cost_args: dict, recompute_every: int, budget: int | None) -> None:
        self.kind, self.cost_args, self.recompute_every = kind, cost_args, recompute_every
        self.calls, self.t = 0, budget
        self.fixed = budget is not None
        self.last_budget = 0

    def select(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # On the CPU whatever the device: the budget search compares sums whose rounding would
        # otherwise depend on the device's reduction order.
        x = x.cpu()
        if not self.fixed and (self.t is None or self.calls % self.recompute_every == 0):
            self.t = best_budget(x, self.kind, CostModel(d=x.numel(), **self.cost_args))
        self.calls += 1
        self.last_budget = t = min(self.t, x.numel())
        if self.kind == "stochastic":
            p = optimal_probabilities(x, float(t))
            norm2 = float(x.double().square().sum())
            step = omega(x, t, norm2) if norm2 > 0 else 1.0  # Lemma 4's omega(T) / L
            keep = torch.rand(x.numel(), generator=generator, dtype=torch.float64) < p
            idx = torch.nonzero(keep).reshape(-1)
            return idx, (step * x[idx].double() / p[idx]).float()
        idx = top_k_indices(magnitudes(x), t)
        return idx, x[idx]


@register("cat")
class CAT(Recipe):
    def __init__(
        self, kind: str = "sparsification", cost: str = "packet", fpp: int = 32,
        c0: float | None = None, c1: float | None = None, packet_bits: int = 1472 * 8,
        packet_overhead_bits: int = 54 * 8, uplink_mbps: float | None = None, latency_ms: float | None = None,
        recompute_every: int = 1, budget: int | None = None, seed: int = 0,
    ) -> None:
        """``budget``: a fixed T instead of the search -- the same compressor and step, untuned
        (the fixed-T baselines of the paper's figures)."""
        if kind not in KINDS or cost not in COSTS:
            raise ValueError(f"kind must be one of {KINDS} and cost one of {COSTS}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be >= 1 or null, got {budget}")
        if c1 is None:  # from the link: seconds per payload bit, or per packet
            bits = 1.0 if cost != "packet" else packet_bits + packet_overhead_bits
            c1 = bits / (uplink_mbps * 1e6) if uplink_mbps else bits
        if c0 is None:
            c0 = latency_ms / 1e3 if latency_ms is not None else (packet_overhead_bits if cost == "affine" else 0.0)
        cost_args = dict(kind=kind, fpp=fpp, cost=cost, c0=c0, c1=c1, packet_bits=packet_bits)
        values = ScaledSign("mean_abs") if kind == "sq" else Float32Values()
        super().__init__(_CATSelector(kind, cost_args, recompute_every, budget), values, seed)
        self.kind = kind
