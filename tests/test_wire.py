import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcomp.compression import PayloadError, build, registered
from fedcomp.wire import pack_frame, unpack_frame

DENSE = ["identity", "fp16", "bf16"]


def test_registry_lists_dense_compressors():
    assert set(DENSE) <= set(registered())
    with pytest.raises(ValueError, match="unknown compressor"):
        build("nope")


@pytest.mark.parametrize("name", DENSE)
@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 7), min_size=0, max_size=3), seed=st.integers(0, 1000))
def test_dense_round_trip(name, shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    c = build(name)
    y = c.decompress(c.compress(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    expected = x.to({"identity": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]).float()
    assert torch.equal(y, expected)


def test_identity_size_is_header_plus_four_bytes_per_value():
    c = build("identity")
    small, big = (len(c.compress(torch.zeros(n))) for n in (10, 1010))
    assert big - small == 4000


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_rejected(bad):
    x = torch.ones(5)
    x[2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        build("identity").compress(x)


@pytest.mark.parametrize("name", DENSE)
def test_every_truncation_and_extension_raises(name):
    c = build(name)
    p = c.compress(torch.randn(3, 5))
    for cut in range(len(p)):
        with pytest.raises(PayloadError):
            c.decompress(p[:cut])
    with pytest.raises(PayloadError, match="trailing"):
        c.decompress(p + b"\0")


@pytest.mark.parametrize("name", DENSE)
def test_every_byte_flip_is_caught(name):
    c = build(name)
    p = bytearray(c.compress(torch.randn(4, 4)))
    rng = np.random.default_rng(0)
    for pos in range(len(p)):
        q = bytearray(p)
        q[pos] ^= int(rng.integers(1, 256))
        with pytest.raises(PayloadError):
            c.decompress(bytes(q))


def test_wrong_codec_and_version_and_huge_shape():
    p = build("fp16").compress(torch.ones(3))
    with pytest.raises(PayloadError, match="expected 'identity'"):
        build("identity").decompress(p)
    bumped = bytearray(p)
    bumped[4] = 99
    with pytest.raises(PayloadError, match="version 99"):
        unpack_frame(bytes(bumped))
    # a header claiming 2^60 elements is refused before anything is allocated
    huge = pack_frame("identity", torch.float32, (2**20, 2**20), b"")
    with pytest.raises(PayloadError, match="more than"):
        build("identity").decompress(huge)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_never_crash(blob):
    with pytest.raises(PayloadError):
        build("identity").decompress(blob)


@settings(max_examples=50, deadline=None)
@given(parts=st.lists(st.one_of(st.binary(max_size=40), st.lists(st.floats(width=32, allow_nan=False), max_size=8)), max_size=5))
def test_a_body_given_in_parts_frames_as_their_concatenation(parts):
    """pack_frame's parts (bytes, or arrays sent as they are) give the joined body's frame."""
    buffers = [p if isinstance(p, bytes) else np.asarray(p, "<f4") for p in parts]
    joined = b"".join(b if isinstance(b, bytes) else b.tobytes() for b in buffers)
    assert pack_frame("parts", torch.float32, (3,), buffers) == pack_frame("parts", torch.float32, (3,), joined)
    assert bytes(unpack_frame(pack_frame("parts", torch.float32, (3,), buffers)).body) == joined
