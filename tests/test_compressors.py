import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcomp.compression import PayloadError, build, registered
from fedcomp.compression.selectors import _top_k_torch, budget, optimal_probabilities, top_k_indices
from fedcomp.config.compose import CONF_DIR
from fedcomp.vectors import all_finite

ALL = registered()
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3)


def tensor(shape, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    return {"randn": lambda: torch.randn(shape, generator=g), "zeros": lambda: torch.zeros(shape),
            "const": lambda: torch.full(shape, 0.7)}[kind]()


def test_registry_has_every_named_compressor():
    expected = {"identity", "fp16", "bf16", "topk", "randomk", "threshold", "adaptive_threshold",
                "terngrad", "qsgd", "signsgd", "scaled_sign", "sq", "stochastic"}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 10**6), kind=st.sampled_from(["randn", "zeros", "const"]))
def test_round_trip_shape_dtype_and_determinism(name, shape, seed, kind):
    x = tensor(shape, seed, kind)
    c = build(name)
    c.reseed(seed)
    y = c.decompress(c.compress(x))
    assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    c2 = build(name)
    c2.reseed(seed)
    c3 = build(name)
    c3.reseed(seed)
    assert c2.compress(x) == c3.compress(x)  # same seed, same payload
    if kind == "zeros" and name != "adaptive_threshold":
        assert not y.any()


@settings(max_examples=50, deadline=None)
@given(d=st.integers(1, 2000), ratio=st.floats(0.001, 1.0), seed=st.integers(0, 10**6))
def test_topk_keeps_exactly_the_k_largest(d, ratio, seed):
    x = tensor((d,), seed)
    y = build("topk", ratio=ratio).decompress(build("topk", ratio=ratio).compress(x))
    k = budget(d, ratio, None)
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])  # values travel exactly
    if k < d:
        assert x[kept].abs().min() >= x[~kept].abs().max()


@pytest.mark.parametrize("k", [0, 1, 7, 50])
def test_k_as_absolute_count_and_edges(k):
    x = tensor((50,), 3)
    for name in ("topk", "randomk", "sq"):
        y = build(name, k=k).decompress(build(name, k=k).compress(x))
        assert int((y != 0).sum()) == k


def test_randomk_values_exact_and_uniform():
    x = tensor((100,), 0) + 10  # no zeros
    counts = torch.zeros(100)
    c = build("randomk", k=10)
    for s in range(400):
        c.reseed(s)
        y = c.decompress(c.compress(x))
        assert torch.equal(y[y != 0], x[y != 0])
        counts += (y != 0).float()
    assert counts.min() > 10 and counts.max() < 75  # each coordinate ~40 times


def test_threshold_sends_exactly_the_large_entries():
    x = torch.tensor([0.5, -2.0, 0.0009, -0.001, 3.0])
    y = build("threshold", v=0.001).decompress(build("threshold", v=0.001).compress(x))
    assert torch.equal(y, torch.tensor([0.5, -2.0, 0.0, -0.001, 3.0]))


def test_signsgd_and_scaled_sign_definitions():
    x = torch.tensor([-3.0, 0.0, 1.0, 2.0])
    assert torch.equal(build("signsgd").decompress(build("signsgd").compress(x)), torch.tensor([-1.0, 0.0, 1.0, 1.0]))
    y = build("scaled_sign").decompress(build("scaled_sign").compress(x))
    assert torch.allclose(y, torch.tensor([-1.5, 0.0, 1.5, 1.5]))  # ||x||_1 / d = 1.5


def test_sq_sends_full_norm_times_sign_on_topk():
    x = torch.tensor([0.1, -4.0, 0.2, 3.0])
    y = build("sq", k=2).decompress(build("sq", k=2).compress(x))
    n = float(x.norm())
    assert torch.allclose(y, torch.tensor([0.0, -n, 0.0, n]))


@pytest.mark.parametrize("name, kwargs", [("terngrad", {}), ("qsgd", {"levels": 4}), ("stochastic", {"ratio": 0.2})])
def test_unbiased_quantizers(name, kwargs):
    x = tensor((64,), 5)
    c = build(name, **kwargs)
    total = torch.zeros(64)
    n = 3000
    for s in range(n):
        c.reseed(s)
        total += c.decompress(c.compress(x))
    assert torch.allclose(total / n, x, atol=0.15 * float(x.abs().max()))


def test_terngrad_and_qsgd_levels():
    x = tensor((300,), 1)
    y = build("terngrad").decompress(build("terngrad").compress(x))
    nz = y[y != 0].abs()
    assert nz.numel() > 0 and torch.allclose(nz, torch.full_like(nz, float(x.abs().max())))
    y = build("qsgd", levels=4).decompress(build("qsgd", levels=4).compress(x))
    steps = y.abs() / (float(x.norm()) / 4)
    assert torch.allclose(steps, steps.round(), atol=1e-4)


def test_optimal_probabilities_water_filling():
    g = torch.tensor([10.0, 1.0, 1.0, 1.0, 0.0])
    p = optimal_probabilities(g, 2.0)
    assert p.sum().item() == pytest.approx(2.0)
    assert p[0] == 1 and p[4] == 0 and torch.allclose(p[1:4], torch.full((3,), 1 / 3, dtype=p.dtype))
    # no p above 1, and the objective beats uniform probabilities
    g = tensor((500,), 9)
    p = optimal_probabilities(g, 50.0)
    assert p.max() <= 1 and p.sum().item() == pytest.approx(50.0)
    nz = p > 0
    assert ((g[nz].double() ** 2) / p[nz]).sum() < ((g.double() ** 2) / 0.1).sum()


def _water_filling_by_full_sort(g: torch.Tensor, t: float) -> torch.Tensor:
    """CAT App. F straight from its definition: sort everything, saturate the n_s largest."""
    a = g.abs().double()
    if t >= int((a > 0).sum()):
        return (a > 0).double()
    s, order = torch.sort(a, descending=True)
    for n_s in range(len(s)):
        tail = s[n_s:].sum()
        if s[n_s] * (t - n_s) <= tail:
            break
    p = torch.ones_like(s)
    p[n_s:] = torch.clamp(s[n_s:] * (t - n_s) / tail, max=1.0)
    return torch.empty_like(p).index_put_((order,), p)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(1, 300), power=st.sampled_from([1, 5, 9]), ties=st.booleans(), frac=st.floats(0.001, 1.2))
def test_optimal_probabilities_equal_the_full_sort_definition(seed, d, power, ties, frac):
    """The partial selection gives the definition's p* (heavy tails, ties, zeros, T near d)."""
    g = torch.randn(d, generator=torch.Generator().manual_seed(seed)) ** power
    if ties:
        g = torch.round(g)
    t = frac * d
    assert torch.allclose(optimal_probabilities(g, t), _water_filling_by_full_sort(g, t), rtol=1e-12, atol=1e-12)


def _top_k_by_definition(a: torch.Tensor, k: int) -> torch.Tensor:
    """Largest first, ties to the lowest index; then ascending."""
    order = np.lexsort((np.arange(a.numel()), -a.numpy().astype(np.float64)))[:k]
    return torch.from_numpy(np.sort(order)).long()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.sampled_from([1, 7, 300, 5_000, 60_000]), frac=st.floats(0.0, 1.0),
       shape=st.sampled_from(["gaussian", "ties", "mostly zero", "ascending", "descending"]))
def test_top_k_indices_equal_the_definition(seed, d, frac, shape):
    """The sampled-threshold selection is exact (ties at the k-th go to the lowest indices),
    whatever the vector's structure does to the strided sample."""
    a = torch.randn(d, generator=torch.Generator().manual_seed(seed)).abs()
    if shape == "ties":
        a = torch.round(a * 2)
    elif shape == "mostly zero":
        a = torch.where(a > 2.0, a, torch.zeros(()))
    elif shape != "gaussian":
        a = torch.sort(a, descending=shape == "descending").values
    k = round(frac * d)
    assert torch.equal(top_k_indices(a, k), _top_k_by_definition(a, k))  # on the CPU: numpy's steps
    if 0 < k < d:  # torch's steps, which other devices take
        assert torch.equal(_top_k_torch(a, k), _top_k_by_definition(a, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_top_k_indices_in_every_dtype(dtype):
    """float16 and bfloat16 take torch's steps on the CPU, float32/64 numpy's: the same choice."""
    a = torch.round(torch.randn(20_000, generator=torch.Generator().manual_seed(1)).abs() * 8).to(dtype)
    for k in (1, 777, 19_999):
        assert torch.equal(top_k_indices(a, k), _top_k_by_definition(a.double(), k))  # exact in float64


def test_top_k_indices_fall_back_when_the_sample_overestimates_the_threshold():
    a = torch.ones(100_000)
    step = 100_000 // 6_400  # the sample's stride at k = 1000
    a[::step] = 2 + torch.arange(len(a[::step]), dtype=torch.float32)  # the sample sees only the largest entries
    a[1] = 1e9
    assert torch.equal(top_k_indices(a, 1000), _top_k_by_definition(a, 1000))
    assert torch.equal(_top_k_torch(a, 1000), _top_k_by_definition(a, 1000))


def test_top_k_indices_keep_k_entries_and_the_nans_of_a_non_finite_vector():
    a = torch.rand(50_000)
    a[[3, 40_000]] = float("nan")
    idx = top_k_indices(a, 500)
    assert idx.numel() == 500 and {3, 40_000} <= set(idx.tolist())


def test_adaptive_threshold_keeps_residue_and_sends_bin_leaders():
    c = build("adaptive_threshold", bin_size=10)
    x = tensor((100,), 2)
    y = c.decompress(c.compress(x))
    assert 10 <= int((y != 0).sum()) < 100  # at least the maximum of each bin
    assert torch.allclose(c.state()["residue"] + y, x)
    c.compress(x)
    assert c.state()["residue"].abs().sum() > 0


@pytest.mark.parametrize("scope", ["model", "layerwise"])
def test_adaptive_threshold_dutta_form_one_threshold_per_segment(scope):
    """bin_size null, no residue: send g_j with |2 g_j| >= max|g| over its segment
    (sands-lab/layer-wise-aaai20), statelessly."""
    sizes = [30, 70]
    x = tensor((100,), 4)
    c = build("adaptive_threshold", bin_size=None, residue=False, scope=scope, sizes=sizes)
    y = c.decompress(c.compress(x))
    segments = torch.split(x, sizes) if scope == "layerwise" else [x]
    expected = torch.cat([torch.where(2 * s.abs() >= s.abs().max(), s, torch.zeros_like(s)) for s in segments])
    assert torch.equal(y, expected)
    assert c.state() == {}


def test_error_feedback_residual_accumulates_what_was_dropped():
    c = build("topk", k=1, error_feedback=True)
    x = torch.tensor([1.0, 0.9, 0.0])
    first = c.decompress(c.compress(x))
    assert torch.equal(first, torch.tensor([1.0, 0.0, 0.0]))
    second = c.decompress(c.compress(x))
    assert torch.equal(second, torch.tensor([0.0, 1.8, 0.0]))  # the dropped 0.9 came back
    # sum of what was sent + residual == sum of inputs
    assert torch.allclose(first + second + c.state()["residual"], 2 * x)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 3000))
def test_error_feedback_residual_is_bitwise_the_dense_formula(name, seed, d):
    """e_{t+1} = x_t + e_t - D(p_t), to the bit (signed zeros included), whether D(p_t) comes back
    sparse (k entries subtracted) or dense; and decompress_sparse rebuilds decompress exactly."""
    c = build(name, error_feedback=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(d, generator=g)
        x[::7] = -0.0
        residual = c.state()["residual"]
        corrected = x + (residual if residual.numel() == d else torch.zeros(d))
        payload = c.compress(x)
        dense = c.decompress(payload)
        expected = corrected - dense
        assert torch.equal(c.state()["residual"].view(torch.int32), expected.view(torch.int32))
        idx, values = c.decompress_sparse(payload)
        rebuilt = values if idx is None else torch.zeros(d).index_put_((idx,), values)
        assert torch.equal(rebuilt.view(torch.int32), dense.view(torch.int32))


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 3000), scope=st.sampled_from(["model", "layerwise"]))
def test_a_donated_update_gives_the_same_payloads_and_residuals(name, seed, d, scope):
    """``compress_donated`` is ``compress`` (payloads and residuals to the bit, signed zeros
    included) with the residual kept in the donated tensor's storage; ``compress`` leaves its
    input as it was."""
    sizes = {"scope": "layerwise", "sizes": [d // 2, d - d // 2]} if scope == "layerwise" and d > 1 else {}
    plain, donated = (build(name, error_feedback=True, **sizes) for _ in range(2))
    g = torch.Generator().manual_seed(seed)
    for step in range(3):
        plain.reseed(seed + step)
        donated.reseed(seed + step)
        x = torch.randn(d, generator=g)
        x[::7] = -0.0
        kept = x.clone()
        given = x.clone()
        assert plain.compress(x) == donated.compress_donated(given)
        assert torch.equal(x.view(torch.int32), kept.view(torch.int32))
        ours, theirs = plain.state()["residual"], donated.state()["residual"]
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
        assert theirs.data_ptr() == given.data_ptr()


def test_a_stateless_compressor_leaves_a_donated_tensor_alone():
    x = torch.randn(100)
    kept = x.clone()
    assert build("qsgd").compress_donated(x) == build("qsgd").compress(kept) and torch.equal(x, kept)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 3000), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_compress_decoded_is_the_payload_and_its_decoding(name, seed, d, dtype):
    """What error feedback subtracts without decoding its own payload is what the receiver
    decodes: same payload, same indices, the same values to the bit, in the payload's dtype."""
    x = tensor((d,), seed).to(dtype)
    a, b = build(name), build(name)
    a.reseed(seed)
    b.reseed(seed)
    payload, (idx, values) = a.compress_decoded(x)
    expected = b.compress(x)
    assert payload == expected
    want_idx, want_values = b.decompress_sparse(expected)
    assert (idx is None) == (want_idx is None) and (idx is None or torch.equal(idx, want_idx))
    bits = torch.int16 if dtype == torch.float16 else torch.int32  # compared bit for bit: -0.0 is not 0.0
    assert values.dtype == want_values.dtype and torch.equal(values.view(bits), want_values.view(bits))


def test_layerwise_scope_applies_the_budget_per_layer():
    x = torch.cat([torch.full((10,), 100.0), torch.ones(90)])
    sizes = [10, 90]
    whole = build("topk", k=5).decompress(build("topk", k=5).compress(x))
    per_layer = build("topk", k=5, scope="layerwise", sizes=sizes)
    y = per_layer.decompress(per_layer.compress(x))
    assert int((whole[10:] != 0).sum()) == 0
    assert int((y[:10] != 0).sum()) == 5 and int((y[10:] != 0).sum()) == 5


@settings(max_examples=60, deadline=None)
@given(d=st.sampled_from([1, 7, 1000, 40_000]), seed=st.integers(0, 10**6),
       bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), strided=st.booleans())
def test_all_finite_is_the_definition(d, seed, bad, dtype, strided):
    """NaN, +Inf or -Inf anywhere, in every float dtype, contiguous or strided."""
    x = tensor((2 * d,), seed).to(dtype)
    x = x[::2] if strided else x[:d]
    if bad is not None:
        x[int(torch.randint(d, (1,), generator=torch.Generator().manual_seed(seed)))] = bad
    assert all_finite(x) == bool(torch.isfinite(x).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_input_rejected(name, bad):
    x = torch.ones(20)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        build(name).compress(x)


@pytest.mark.parametrize("name", ALL)
def test_truncation_and_flips_decode_or_raise(name):
    c = build(name)
    payload = c.compress(tensor((40,), 4))
    for cut in range(len(payload)):
        with pytest.raises(PayloadError):
            c.decompress(payload[:cut])
    rng = np.random.default_rng(0)
    for pos in range(len(payload)):
        bad = bytearray(payload)
        bad[pos] ^= int(rng.integers(1, 256))
        try:
            y = c.decompress(bytes(bad))
        except PayloadError:
            continue
        assert y.numel() <= 2**28


def test_layerwise_payload_corruption():
    c = build("qsgd", scope="layerwise", sizes=[30, 10])
    payload = c.compress(tensor((40,), 4))
    for cut in range(0, len(payload), 3):
        with pytest.raises(PayloadError):
            c.decompress(payload[:cut])


@pytest.mark.parametrize("config", sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml")))
def test_every_compressor_config_builds_through_hydra(config):
    from hydra.utils import instantiate

    from fedcomp.config import compose_config

    cfg = compose_config([f"compressor={config}"])
    for direction in ("up", "down"):
        c = instantiate(cfg.compressor[direction], sizes=[60, 40])
        x = tensor((100,), 1)
        assert c.decompress(c.compress(x)).shape == x.shape


def test_every_registered_compressor_has_a_config():

    configs = {p.stem for p in (CONF_DIR / "compressor").glob("*.yaml")}
    assert set(ALL) - {"identity"} <= configs


@pytest.mark.parametrize("name", ["terngrad", "qsgd", "signsgd", "scaled_sign", "sq"])
def test_deflate_option_round_trips_and_never_grows_the_payload(name):
    x = torch.cat([torch.zeros(3000), tensor((200,), 6)])  # long zero runs
    plain, deflated = build(name), build(name, deflate=True)
    p1, p2 = plain.compress(x), deflated.compress(x)
    assert len(p2) <= len(p1)
    assert torch.equal(deflated.decompress(p2), plain.decompress(p1))


def test_stc_is_sparse_ternary_with_mean_magnitude():
    x = torch.tensor([0.1, -4.0, 0.2, 2.0, -0.3])
    y = build("stc", k=2).decompress(build("stc", k=2).compress(x))
    assert torch.allclose(y, torch.tensor([0.0, -3.0, 0.0, 3.0, 0.0]))  # mu = (4 + 2) / 2


def test_dgc_momentum_correction_and_factor_masking():
    c = build("dgc", ratio=0.25, momentum=0.5)  # k = 1 of 4
    g = torch.tensor([1.0, 0.5, 0.1, 0.0])
    first = c.decompress(c.compress(g))
    assert torch.equal(first, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    state = c.state()
    assert state["u"][0] == 0 and state["v"][0] == 0  # masked after sending
    assert torch.allclose(state["v"], torch.tensor([0.0, 0.5, 0.1, 0.0]))
    second = c.decompress(c.compress(g))
    # u = 0.5 u + g -> [1, 0.75, 0.15, 0]; v += u -> [1, 1.25, 0.25, 0]: coordinate 1 goes
    assert torch.allclose(second, torch.tensor([0.0, 1.25, 0.0, 0.0]))


def test_dgc_clipping_and_warmup():
    c = build("dgc", ratio=0.01, momentum=0.0, clip_norm=1.0, warmup_rounds=10)
    x = tensor((1000,), 3) * 100
    c.set_round(1)
    y = c.decompress(c.compress(x))
    assert int((y != 0).sum()) == 250  # warm-up starts at 25%
    assert float(y.norm()) <= 1.0 + 1e-5  # clipped before selection
    c.set_round(11)
    assert int((c.decompress(c.compress(x)) != 0).sum()) == 10
