import pytest
import torch

from fedcomp.compression import build
from fedcomp.compression.cat import CostModel, best_budget, omega
from fedcomp.compression.selectors import optimal_probabilities


def brute_force(g, kind, cost):
    d = g.numel()
    a = torch.sort(g.abs().double(), descending=True).values
    norm2 = float((a * a).sum())
    t = torch.arange(1, d + 1)
    if kind == "sparsification":
        imp = torch.cumsum(a**2, 0) / norm2
    else:
        imp = torch.cumsum(a, 0) ** 2 / (t * norm2)
    eff = imp / cost(t)  # every T in [1, d]: the search may skip T only where it cannot win
    return int(torch.argmax(eff)) + 1, float(eff.max())


@pytest.mark.parametrize("kind", ["sparsification", "sq"])
@pytest.mark.parametrize("model", [("affine", 1.0, 64 * 8), ("packet", 128 * 8, 64 * 8), ("affine", 1e-7, 0.02)])
@pytest.mark.parametrize("seed", range(4))
def test_search_finds_the_brute_force_optimum(kind, model, seed):
    g = torch.randn(3000, generator=torch.Generator().manual_seed(seed)) * torch.exp(2 * torch.randn(3000, generator=torch.Generator().manual_seed(seed + 99)))
    cost_kind, c1, c0 = model
    cost = CostModel(kind, 32, g.numel(), cost_kind, c0, c1, 128 * 8)
    t = best_budget(g, kind, cost)
    t_star, eff_star = brute_force(g, kind, cost)
    a = torch.sort(g.abs().double(), descending=True).values
    norm2 = float((a * a).sum())
    imp = (torch.cumsum(a**2, 0)[t - 1] / norm2) if kind == "sparsification" else torch.cumsum(a, 0)[t - 1] ** 2 / (t * norm2)
    assert float(imp / cost(torch.tensor(t))) == pytest.approx(eff_star, rel=1e-6)


def test_payload_model_sparsification_picks_one():
    g = torch.randn(500)
    assert best_budget(g, "sparsification", CostModel("sparsification", 32, 500, "payload", 0, 1, 1024)) == 1  # Proposition 2


@pytest.mark.parametrize("model", [("affine", 1.0, 500.0), ("packet", 1024, 512)])
def test_stochastic_search_against_brute_force_on_small_vectors(model):
    cost_kind, c1, c0 = model
    for seed in range(3):
        g = torch.randn(120, generator=torch.Generator().manual_seed(seed)) ** 3
        cost = CostModel("stochastic", 64, 120, cost_kind, c0, c1, 256)
        norm2 = float((g.double() ** 2).sum())
        t = best_budget(g, "stochastic", cost)
        effs = [omega(g, s, norm2) / float(cost(torch.tensor(float(s)))) for s in range(1, 121)]
        assert omega(g, t, norm2) / float(cost(torch.tensor(float(t)))) >= max(effs) * (1 - 1e-9)


def test_packet_budgets_subtract_the_sq_header():
    """The paper's packet constants (Fig. 1c): P_max = 128 B, FPP = 64; d = 7850 needs 13-bit indices."""
    sq = CostModel("sq", 64, 7850, "packet", 512, 1024, 1024)
    assert sq.packet_budgets(7850)[:3].tolist() == [(1024 - 64) // 13, (2048 - 64) // 13, (3072 - 64) // 13]
    s = CostModel("sparsification", 64, 7850, "packet", 512, 1024, 1024)
    assert s.packet_budgets(7850)[:3].tolist() == [1024 // 77, 2048 // 77, 3072 // 77]
    for c, t in enumerate(sq.packet_budgets(7850)[:-1].tolist(), start=1):  # T_c fills c packets, T_c + 1 needs c + 1
        assert sq(torch.tensor(t)) == 1024 * c + 512 and sq(torch.tensor(t + 1)) == 1024 * (c + 1) + 512


def test_stochastic_cat_scales_values_by_omega():
    g = torch.randn(400, generator=torch.Generator().manual_seed(3)) ** 3
    c = build("cat", kind="stochastic", cost="affine", c0=5000, c1=1, seed=1)
    y = c.decompress(c.compress(g))
    t = c.selector.last_budget
    p = optimal_probabilities(g, float(t))
    w = omega(g, t, float((g.double() ** 2).sum()))
    kept = y != 0
    assert 0 < w < 1 and torch.allclose(y[kept].double(), w * g[kept].double() / p[kept], rtol=1e-5)


def test_cat_compressors_round_trip_and_recompute_every():
    g = torch.randn(2000) * torch.exp(torch.randn(2000))
    for kind in ("sparsification", "sq", "stochastic"):
        c = build("cat", kind=kind, cost="packet", uplink_mbps=10, latency_ms=20)
        y = c.decompress(c.compress(g))
        assert y.shape == g.shape and 0 < int((y != 0).sum()) <= 2000
    sq = build("cat", kind="sq", cost="affine", c0=512, c1=1)
    y = sq.decompress(sq.compress(g))
    kept = y != 0
    assert torch.allclose(y[kept].abs(), g[kept].abs().mean().expand(int(kept.sum())), rtol=1e-5)  # mean top-T magnitude
    slow = build("cat", kind="sparsification", cost="affine", c0=512, c1=1, recompute_every=3)
    slow.compress(g)
    t0 = slow.selector.t
    slow.compress(g * torch.exp(torch.randn(2000)))
    assert slow.selector.t == t0


def test_fixed_budget_skips_the_search_and_keeps_the_step():
    g = torch.randn(500, generator=torch.Generator().manual_seed(5))
    fixed = build("cat", kind="sq", cost="packet", c0=512, c1=1024, packet_bits=1024, fpp=64, budget=7)
    y = fixed.decompress(fixed.compress(g))
    kept = y != 0
    assert int(kept.sum()) == 7 and torch.equal(kept, torch.zeros(500, dtype=torch.bool).index_fill_(0, torch.topk(g.abs(), 7).indices, True))
    assert torch.allclose(y[kept].abs(), torch.topk(g.abs(), 7).values.mean().expand(7))  # Lemma 3's step, as CAT's
