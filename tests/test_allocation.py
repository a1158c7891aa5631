import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from fedcomp.allocation import dagc_phi, dagc_ratios, rescale_ratios


def theorem4_closed_form(p_sorted, mean_ratio, j):
    """Theorem 4's candidate for delta_min = delta_j (0-based j, p sorted descending)."""
    n = len(p_sorted)
    q = p_sorted ** (2 / 3)
    ref = n - 2 if j == n - 1 else n - 1
    big_q = (q.sum() - q[j]) / q[ref]
    d = n * mean_ratio / (big_q + 1) * q / q[ref]
    d[j] = n * mean_ratio / (big_q + 1)
    phi = (p_sorted[j] * (1 + big_q) + p_sorted[ref] * big_q * (1 + big_q)) / (n * mean_ratio)
    return d, phi


def test_paper_reproduces_the_worked_example():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    d = dagc_ratios(p, 0.01, "paper")
    assert np.allclose(d * 100, [1.534, 1.091, 0.687, 0.687], atol=1e-3)
    assert dagc_phi(p, d) == pytest.approx(112.42, abs=0.01)
    assert dagc_phi(p, np.full(4, 0.01)) == pytest.approx(100.0)
    assert dagc_phi(p, dagc_ratios(p, 0.01, "exact")) <= 100.0 + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_paper_matches_theorem4_both_cases(seed):
    rng = np.random.default_rng(seed)
    p = np.sort(rng.dirichlet(np.full(6, 1.0)))[::-1]
    d = dagc_ratios(p, 0.01, "paper")
    candidates = [theorem4_closed_form(p, 0.01, j) for j in range(6)]
    # the closed-form bound is attained at its candidate, in both cases (j != n and j = n)
    for cand, phi in candidates:
        assert dagc_phi(p, cand) == pytest.approx(phi, rel=1e-9)
    best = min(candidates, key=lambda c: c[1])[0]
    assert np.allclose(d, best)


def scipy_optimum(p, mean_ratio, starts=8, seed=0):
    n = len(p)
    rng = np.random.default_rng(seed)
    cons = ({"type": "eq", "fun": lambda x: np.exp(x).sum() - n * mean_ratio},)
    best = np.inf
    for s in range(starts):
        x0 = np.log(rng.dirichlet(np.ones(n)) * n * mean_ratio) if s else np.log(np.full(n, mean_ratio))
        with np.errstate(divide="ignore", over="ignore"):  # the optimiser probes the boundary
            res = minimize(lambda x: dagc_phi(p, np.exp(x)), x0, constraints=cons, method="SLSQP",
                           bounds=[(None, 0.0)] * n, options={"maxiter": 500, "ftol": 1e-12})
        if res.success or res.status == 8:
            d = np.exp(res.x)
            if abs(d.sum() - n * mean_ratio) < 1e-6 * n:
                best = min(best, dagc_phi(p, d))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mean_ratio", [0.001, 0.01, 0.3])
def test_exact_matches_a_numerical_optimiser(seed, mean_ratio):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(rng.integers(2, 9), 0.5))
    p = np.maximum(p, 1e-6)
    d = dagc_ratios(p, mean_ratio, "exact")
    ours = dagc_phi(p, d)
    assert ours <= scipy_optimum(p, mean_ratio) * (1 + 1e-6)
    assert ours <= dagc_phi(p, np.full(len(p), mean_ratio)) * (1 + 1e-9)
    assert ours <= dagc_phi(p, dagc_ratios(p, mean_ratio, "paper")) * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(w=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=30), mean=st.floats(0.0005, 1.0),
       method=st.sampled_from(["paper", "exact"]), seed=st.integers(0, 1000))
def test_budget_bounds_and_callers_order(w, mean, method, seed):
    w = np.array(w)
    d = dagc_ratios(w, mean, method)
    assert d.sum() == pytest.approx(len(w) * mean, rel=1e-6)
    assert np.all(d > 0) and np.all(d <= 1 + 1e-12)
    perm = np.random.default_rng(seed).permutation(len(w))
    shuffled = dagc_ratios(w[perm], mean, method)
    if len(np.unique(w)) == len(w):
        assert np.allclose(shuffled, d[perm], rtol=1e-6)  # each ratio follows its worker
    else:  # Algorithm 2 may treat tied workers differently; the allocation itself is the same
        assert np.allclose(np.sort(shuffled), np.sort(d), rtol=1e-6)


def test_equal_weights_single_worker_and_normalisation():
    for method in ("paper", "exact"):
        assert np.allclose(dagc_ratios(np.ones(5), 0.02, method), 0.02)
        assert np.allclose(dagc_ratios(np.array([3.0]), 0.1, method), [0.1])
        assert np.allclose(dagc_ratios(np.array([5.0, 3.0, 1.5, 0.5]), 0.01, method),
                           dagc_ratios(np.array([0.5, 0.3, 0.15, 0.05]), 0.01, method))
    with pytest.raises(ValueError):
        dagc_ratios(np.array([0.5, 0.0]), 0.01)
    with pytest.raises(ValueError):
        dagc_ratios(np.array([0.5, 0.5]), 1.5)


def test_rescaling_for_a_new_mean():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    d = dagc_ratios(p, 0.01)
    r = rescale_ratios(d, 0.01, 0.02)
    assert np.allclose(r, 2 * d) and r.mean() == pytest.approx(0.02)
    capped = rescale_ratios(d, 0.01, 0.9)
    assert capped.max() <= 1 and capped.mean() == pytest.approx(0.9)
