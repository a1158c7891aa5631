import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcomp.partition import dirichlet, iid, shards, volume_skew, volume_skew_weights


def labels(n, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "a sample was lost or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))


PARTITIONERS = {
    "iid": lambda y, k, s: iid(y, k, s),
    "dirichlet": lambda y, k, s: dirichlet(y, k, 0.3, s),
    "volume_skew": lambda y, k, s: volume_skew(y, k, 50.0, s),
    "volume_skew_labels": lambda y, k, s: volume_skew(y, k, 50.0, s, label_alpha=0.5),
    "shards": lambda y, k, s: shards(y, k, 2, s),
}


@pytest.mark.parametrize("name", PARTITIONERS)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(40, 3000), k=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_every_sample_exactly_once_and_no_empty_client(name, n, k, seed):
    y = labels(n, seed=seed % 100)
    parts = PARTITIONERS[name](y, k, seed)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("name", PARTITIONERS)
def test_deterministic_per_seed(name):
    y = labels(5000)
    a, b, c = (PARTITIONERS[name](y, 10, s) for s in (7, 7, 8))
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c)), "another seed must give another split"


def mean_label_entropy(y, parts, classes=10):
    ent = []
    for p in parts:
        q = np.bincount(y[p], minlength=classes) / len(p)
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_dirichlet_alpha_controls_label_skew():
    y = labels(20000)
    ent = {a: mean_label_entropy(y, dirichlet(y, 20, a, seed=1)) for a in (0.05, 0.5, 100.0)}
    assert ent[0.05] < ent[0.5] < ent[100.0]
    assert ent[100.0] > 0.97 * np.log(10)  # near-uniform labels at large alpha
    assert ent[0.05] < 0.5 * np.log(10)


def test_dirichlet_tiny_alpha_many_clients_still_gives_everyone_min_samples():
    y = labels(2000)
    parts = dirichlet(y, 100, 0.01, seed=3, min_samples=5, max_redraws=2)
    assert_exact_cover(parts, 2000)
    assert min(len(p) for p in parts) >= 5


@pytest.mark.parametrize("sr", [1.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("n", [2, 3, 10, 25])
def test_volume_skew_weights_ratio_and_order(sr, n):
    p = volume_skew_weights(n, sr, seed=4)
    assert np.isclose(p.sum(), 1.0)
    assert np.all(np.diff(p) <= 1e-15), "weights must be descending"
    assert np.isclose(p[0] / p[-1], sr)


def test_volume_skew_weights_are_arithmetic_on_average():
    # Relative to p_n the expected series is exactly arithmetic from SR down to 1.
    rel = np.mean([(p := volume_skew_weights(10, 100.0, seed=s)) / p[-1] for s in range(4000)], axis=0)
    assert np.allclose(rel, np.linspace(100.0, 1.0, 10), rtol=0.03)


@pytest.mark.parametrize("sr", [10.0, 100.0, 1000.0])
def test_volume_skew_geometric_series_is_log_spaced_as_the_authors_generate_it(sr):
    p = volume_skew_weights(10, sr, seed=4, series="geometric")
    assert np.isclose(p.sum(), 1.0) and np.isclose(p[0] / p[-1], sr)
    assert p[-1] == p[-2]  # the last size repeated (get_skew_distribution)
    assert np.allclose(p[:-2] / p[1:-1], sr ** (1 / 8))  # constant ratio over the 9 log-spaced sizes
    assert np.array_equal(p, volume_skew_weights(10, sr, seed=5, series="geometric"))  # no noise
    parts = volume_skew(labels(60000), 10, sr, seed=0, series="geometric")
    sizes = np.array([len(x) for x in parts])
    assert sizes[0] / sizes[-1] == pytest.approx(sr, rel=0.05)


def test_volume_skew_sizes_follow_skew_ratio():
    y = labels(60000)
    parts = volume_skew(y, 10, 100.0, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert np.all(np.diff(sizes) <= 0)
    assert sizes[0] / sizes[-1] == pytest.approx(100.0, rel=0.02)


def test_volume_skew_label_alpha_skews_labels():
    y = labels(20000)
    iid_ent = mean_label_entropy(y, volume_skew(y, 10, 10.0, 0))
    skew_ent = mean_label_entropy(y, volume_skew(y, 10, 10.0, 0, label_alpha=0.1))
    assert skew_ent < 0.7 * iid_ent


def test_shards_give_few_labels():
    y = np.repeat(np.arange(10), 100)
    parts = shards(y, 10, 2, seed=0)
    assert all(len(np.unique(y[p])) <= 2 for p in parts)


def test_too_many_clients_is_an_error():
    with pytest.raises(ValueError, match="cannot give"):
        iid(labels(5), 6, 0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(labels(50), 2, 0.0, 0)


def test_explicit_fractions():
    from fedcomp.partition import explicit

    y = labels(22000)
    parts = explicit(y, [0.5] + [0.05] * 10, seed=0)
    assert_exact_cover(parts, 22000)
    assert [len(p) for p in parts] == [11000] + [1100] * 10
