import pytest
import torch

from fedcomp import vectors


@pytest.fixture(params=["numpy", "torch"])
def path(request, monkeypatch):
    """Both ways of a pass: numpy (small CPU vectors) and torch (larger ones)."""
    if request.param == "torch":
        monkeypatch.setattr(vectors, "NUMPY_MAX_NUMEL", 0)
    return request.param


def test_small_cpu_float_vectors_go_to_numpy():
    assert vectors.in_numpy(torch.zeros(vectors.NUMPY_MAX_NUMEL))
    assert not vectors.in_numpy(torch.zeros(vectors.NUMPY_MAX_NUMEL + 1))
    assert not vectors.in_numpy(torch.zeros(10, dtype=torch.bfloat16)) and not vectors.in_numpy(torch.zeros(10, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_finds_every_nan_and_inf(dtype, path):
    x = torch.randn(1000).to(dtype)
    assert vectors.all_finite(x) and vectors.all_finite(x[::3]) and vectors.all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 517, 999):
            y = x.clone()
            y[at] = bad
            assert not vectors.all_finite(y)
    assert vectors.all_finite(torch.arange(5))  # integers are finite
    assert vectors.all_finite(torch.full((10,), torch.finfo(dtype).max, dtype=dtype))  # finite, though their squares overflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_share_nothing(dtype, path):
    x = torch.randn(2, 50).to(dtype)
    y = vectors.clone(x[:, ::2])
    assert torch.equal(y, x[:, ::2]) and y.is_contiguous()
    y.add_(1)
    assert not torch.equal(y, x[:, ::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_in_place_is_torch_s_sum_to_the_bit(dtype, path):
    """In place, in ``a``'s own storage, with a tensor or a number (-0.0 + 0.0 is +0.0, as in
    torch); a ``b`` of another dtype (bfloat16 memory) is added by torch, promoted as ``add_`` does."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g).to(dtype)
    a[::7] = -0.0
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for b in (torch.randn(1000, generator=g).to(dtype), 0.0, torch.randn(1000, generator=g).to(torch.bfloat16)):
        x, expected = a.clone(), a.clone().add_(b)
        out = vectors.add_(x, b)
        assert out is x and torch.equal(x.view(bits), expected.view(bits))
