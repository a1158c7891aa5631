import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedcomp.allocation import adaptopk_ratio, dagc_ratios, fit_alpha_beta, lemma_t_hat, log_contraction
from fedcomp.allocation.controllers import DAGC, Accordion, AdapTopK, Explicit, History, Uniform
from fedcomp.compression import build


def test_uniform_explicit_and_dagc_controllers():
    h = History(weights=np.array([0.5, 0.3, 0.15, 0.05]))
    assert Uniform(0.01).ratios(1, [0, 2], h) == {0: 0.01, 2: 0.01}
    assert Explicit([0.1, 0.2, 0.3, 0.4]).ratios(1, [3, 1], h) == {3: 0.4, 1: 0.2}
    d = dagc_ratios(h.weights, 0.01, "paper")
    assert DAGC(0.01).ratios(7, [0, 3], h) == {0: d[0], 3: d[3]}


def test_adaptopk_schedule_keeps_the_fixed_topk_budget():
    T, k = 100, 0.01
    r = [adaptopk_ratio(t, k, 0.5, 40, T) for t in range(1, T + 1)]
    assert r[0] == pytest.approx(0.015) and r[20] == pytest.approx(0.005) and r[-1] == pytest.approx(0.015)
    assert sum(r) == pytest.approx(k * T)  # same total as fixed top-k
    assert sum(1 for x in r if x < k) == T // 2  # the (1 - gamma) window is T/2 long
    assert AdapTopK(0.01, 0.5, T).t_hat == 50


@settings(max_examples=200, deadline=None)
@given(st.floats(-2, 3), st.floats(-3, 1), st.floats(-6, -1))
def test_lemma_t_hat_is_where_the_weight_stops_falling(log_alpha, log_beta, log_neg_ln_b):
    """Lemma 3: A_t B_t = (alpha / t + beta) B^(T-1-t) falls for t < t_hat and rises after
    (brute force over t; the closed form's floor may sit one step early)."""
    alpha, beta, ln_b = 10**log_alpha, 10**log_beta, -(10**log_neg_ln_b)
    t_hat = lemma_t_hat(alpha, beta, ln_b)
    assume(t_hat < 10**6)
    t = np.arange(1, int(t_hat) + 50)
    weight = (alpha / t + beta) * np.exp(-ln_b * t)  # B^(T-1-t) up to the constant B^(T-1)
    first_rise = int(np.argmax(weight[1:] >= weight[:-1])) + 1
    assert abs(first_rise - t_hat) <= 1


def test_lemma_inputs_and_alpha_beta_fit():
    assert lemma_t_hat(1.0, 0.0, -0.1) == float("inf")  # no noise floor: keeps falling
    assert log_contraction(0.1, 0.02, 0.01, error_compensation=True) == pytest.approx(np.log(1 - 0.001))
    assert log_contraction(0.1, 0.02, 0.01, error_compensation=False) == pytest.approx(np.log(1 - 0.00002))
    with pytest.raises(ValueError, match="B ="):
        log_contraction(1.0, 3.0, 0.01, error_compensation=True)
    t = np.arange(1, 31)
    assert fit_alpha_beta(5.0 / t + 0.3) == pytest.approx((5.0, 0.3))
    assert fit_alpha_beta(np.full(10, 2.0))[0] == pytest.approx(0.0, abs=1e-9)
    alpha, beta = fit_alpha_beta(5.0 / t - 0.01)  # unconstrained beta would be negative
    assert beta == 0.0 and alpha > 4.0


def test_adaptopk_lemma_estimates_t_hat_after_the_first_rounds_and_keeps_the_budget():
    T, k, W = 200, 0.01, 10
    ctl = AdapTopK(k, 0.5, T, "lemma", mu=0.5, lr=0.1, error_compensation=True, estimate_rounds=W)
    h = History(weights=np.ones(2))
    ratios = []
    for rnd in range(1, T + 1):
        ratios.append(ctl.ratios(rnd, [0, 1], h)[0])
        h.grad_sq_norms.append(4.0 / rnd + 0.5)  # what the clients would report for this round
    alpha, beta = ctl.fit
    assert (alpha, beta) == (pytest.approx(4.0), pytest.approx(0.5))
    assert ctl.t_hat == min(max(lemma_t_hat(4.0, 0.5, np.log(1 - 0.025)), 2 * W), T)
    assert all(r == pytest.approx(1.5 * k) for r in ratios[:W])  # estimating: first segment
    assert sum(ratios) == pytest.approx(T * k)  # same total as fixed top-k
    with pytest.raises(ValueError, match="t_hat"):
        AdapTopK(k, 0.5, T, "estimate")


def test_accordion_switches_on_norm_change():
    acc = Accordion(low=0.001, high=0.01, eta=0.5, interval=2)
    h = History(weights=np.ones(2))
    assert acc.ratios(1, [0], h) == {0: 0.01}  # critical at the start
    h.update_norms = [1.0, 1.0, 1.0, 1.0]
    assert acc.ratios(5, [0], h) == {0: 0.001}  # no change: compress hard
    h.update_norms += [0.2, 0.2]
    assert acc.ratios(7, [0], h) == {0: 0.01}  # big change: critical again


def test_set_ratio_reaches_the_sparsifier_and_is_refused_by_dense_compressors():
    import torch

    c = build("topk", ratio=0.5, error_feedback=True, scope="layerwise", sizes=[50, 50])
    c.set_ratio(0.1)
    assert int((c.decompress(c.compress(torch.randn(100))) != 0).sum()) == 10
    with pytest.raises(ValueError, match="no sparsification ratio"):
        build("qsgd").set_ratio(0.1)


@pytest.mark.parametrize("extra", [("compressor=topk",), ("strategy=hgc",)])
def test_dagc_controller_end_to_end_records_per_client_ratios(fast_cfg, tmp_path, extra):
    from fedcomp.fl.engine import run_inline

    cfg = fast_cfg("partition=volume_skew", "partition.skew_ratio=20", "controller=dagc", "controller.mean_ratio=0.05", *extra)
    run_inline(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    weights = np.array(json.loads((tmp_path / "partition.json").read_text())["weights"])
    expected = dagc_ratios(weights, 0.05, "paper")
    for row in rows:
        got = {int(c): v["ratio"] for c, v in row["clients"].items()}
        if extra == ("compressor=topk",):
            assert got == pytest.approx({c: expected[c] for c in got})
            # bigger ratio, more bytes: the budget shows up in the payloads
            order = sorted(got, key=got.get)
            assert row["clients"][str(order[0])]["bytes_up"] < row["clients"][str(order[-1])]["bytes_up"]
        else:  # HGC's shared mask takes the mean ratio
            assert len(set(got.values())) == 1 and list(got.values())[0] == pytest.approx(expected.mean(), rel=0.01)


@pytest.mark.parametrize("extra", [("compressor=topk",), ("strategy=hgc",)])
def test_adaptopk_lemma_end_to_end_uses_the_clients_gradient_norms(fast_cfg, tmp_path, extra):
    from fedcomp.fl.engine import run_inline

    cfg = fast_cfg("num_rounds=8", "controller=adaptopk", "controller.ratio=0.1", "controller.t_hat=lemma",
                   "controller.estimate_rounds=2", "controller.mu=0.5", *extra)
    run_inline(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    norms = [[c["grad_sq_norm"] for c in r["clients"].values()] for r in rows]
    assert all(n > 0 and np.isfinite(n) for round_norms in norms for n in round_norms)
    ratios = [next(iter(r["clients"].values()))["ratio"] for r in rows]
    assert ratios[:2] == [pytest.approx(0.15, rel=0.01)] * 2  # estimating: (1 + gamma) k
    assert sum(ratios) == pytest.approx(8 * 0.1, rel=0.01)  # budget of fixed top-k (HGC rounds k)


def test_controller_cat_selects_the_client_side_cat_compressor(fast_cfg):
    cfg = fast_cfg("controller=cat", "compressor.up.cost=affine")
    assert cfg.compressor.up.name == "cat" and cfg.compressor.up.cost == "affine"
    assert not cfg.controller  # no server-side controller: T is chosen where the gradient is
