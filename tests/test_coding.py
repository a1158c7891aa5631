import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import gammaln

from fedcomp.coding import decode_indices, decode_symbols, encode_indices, encode_symbols, pack_bits, unpack_bits
from fedcomp.compression import PayloadError


@settings(max_examples=200, deadline=None)
@given(width=st.integers(0, 64), values=st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_bitpack_round_trip(width, values):
    vals = np.array([v & ((1 << width) - 1) for v in values], dtype=np.uint64)
    blob = pack_bits(vals, width)
    assert len(blob) == -(-len(vals) * width // 8)
    assert np.array_equal(unpack_bits(blob, width, len(vals), np.uint64), vals)


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 9, 17, 33])
def test_bitpack_chunks_and_matches_the_bit_definition(width):
    """Values spanning several chunks; each value is its width bits, MSB first."""
    from fedcomp.coding import bitpack

    n = 2 * bitpack._CHUNK + 13
    vals = np.random.default_rng(width).integers(0, 2**width, size=n, dtype=np.uint64)
    blob = pack_bits(vals, width)
    bits = np.unpackbits(np.frombuffer(blob, np.uint8))[: n * width].reshape(n, width)
    assert np.array_equal((bits.astype(np.uint64) << np.arange(width - 1, -1, -1, dtype=np.uint64)).sum(axis=1), vals)
    out = unpack_bits(blob, width, n)
    assert out.dtype == np.int64 and np.array_equal(out, vals.astype(np.int64))


def test_bitpack_rejects_values_too_wide_and_short_input():
    with pytest.raises(ValueError, match="fit"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="fit"):
        pack_bits(np.array([-1]), 8)
    with pytest.raises(PayloadError, match="truncated"):
        unpack_bits(b"\x00", 3, 3)


@st.composite
def index_sets(draw):
    d = draw(st.one_of(st.integers(0, 5000), st.integers(2**40, 2**63 - 1)))
    k = draw(st.integers(0, min(d, 300)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if d <= 10**6:
        idx = rng.choice(d, size=k, replace=False)
    else:  # int64-range d: draw distinct values without materialising range(d)
        idx = np.unique(rng.integers(0, d, size=k, dtype=np.int64))
    return np.sort(np.asarray(idx, dtype=np.int64)), d


@settings(max_examples=300, deadline=None)
@given(case=index_sets())
def test_index_round_trip(case):
    idx, d = case
    out = decode_indices(encode_indices(idx, d), d)
    assert out.dtype == np.int64 and np.array_equal(out, idx)


@pytest.mark.parametrize("idx, d", [([], 0), ([], 7), ([0], 1), (list(range(9)), 9), ([2**63 - 2], 2**63 - 1), ([0, 2**62], 2**63 - 1)])
def test_index_edge_cases(idx, d):
    idx = np.array(idx, dtype=np.int64)
    assert np.array_equal(decode_indices(encode_indices(idx, d), d), idx)


@pytest.mark.parametrize("idx, d, msg", [([3, 1], 5, "sorted"), ([1, 1], 5, "sorted"), ([5], 5, r"\[0, 5\)"), ([-1], 5, r"\[0, 5\)")])
def test_encoder_rejects_bad_indices(idx, d, msg):
    with pytest.raises(ValueError, match=msg):
        encode_indices(np.array(idx), d)


@settings(max_examples=300, deadline=None)
@given(gaps=st.one_of(st.lists(st.integers(0, 2**40), min_size=1, max_size=60), st.lists(st.integers(0, 3), min_size=1, max_size=60),
                      st.lists(st.sampled_from([0, 0, 0, 1, 500, 2**20]), min_size=1, max_size=60)))
def test_rice_parameter_is_the_smallest_size_minimiser(gaps):
    """The walk from the geometric estimate finds the exhaustive search's b (lowest on ties)."""
    from fedcomp.coding import index_code_bits, rice_parameter

    g = np.array(gaps, dtype=np.int64)
    assert rice_parameter(g) == min(range(int(g.max()).bit_length() + 1), key=lambda b: index_code_bits(g, b))


@pytest.mark.parametrize("d, k", [(10**6, 10**3), (10**6, 10**4)])
def test_index_size_near_information_limit(d, k):
    limit_bits = (gammaln(d + 1) - gammaln(k + 1) - gammaln(d - k + 1)) / np.log(2)
    rng = np.random.default_rng(k)
    for _ in range(5):
        idx = np.sort(rng.choice(d, size=k, replace=False))
        assert 8 * len(encode_indices(idx, d)) <= 1.03 * limit_bits


def test_every_truncation_and_flip_decodes_or_raises():
    rng = np.random.default_rng(0)
    d = 5000
    idx = np.sort(rng.choice(d, size=60, replace=False))
    blob = encode_indices(idx, d)
    for cut in range(len(blob)):
        with pytest.raises(PayloadError):
            decode_indices(blob[:cut], d)
    for pos in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            try:
                out = decode_indices(bytes(bad), d)
            except PayloadError:
                continue
            assert out.dtype == np.int64 and np.all(np.diff(out) > 0) and (out.size == 0 or (out[0] >= 0 and out[-1] < d))


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=64), d=st.integers(0, 2**63 - 1))
def test_random_bytes_decode_or_raise(blob, d):
    try:
        out = decode_indices(blob, d)
    except PayloadError:
        return
    assert np.all(np.diff(out) > 0) and (out.size == 0 or (out[0] >= 0 and out[-1] < d))


def test_huge_k_claim_is_refused_before_allocation():
    import struct

    blob = struct.pack("<BBQ", 1, 0, 2**60) + b"\x00" * 8
    with pytest.raises(PayloadError, match="truncated|claims"):
        decode_indices(blob, 2**62)


def empirical_entropy_bytes(symbols, alphabet):
    c = np.bincount(symbols, minlength=alphabet)
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum() / 8)


@settings(max_examples=200, deadline=None)
@given(alphabet=st.integers(1, 300), n=st.integers(0, 2000), skew=st.floats(0.0, 5.0), seed=st.integers(0, 2**31))
def test_symbol_round_trip(alphabet, n, skew, seed):
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.arange(alphabet))
    s = rng.choice(alphabet, size=n, p=p / p.sum())
    out = decode_symbols(encode_symbols(s, alphabet), alphabet)
    assert out.dtype == np.int64 and np.array_equal(out, s)


@pytest.mark.parametrize("alphabet, probs", [(3, [0.1, 0.8, 0.1]), (3, [0.3, 0.4, 0.3]), (16, None), (255, None), (2, [0.05, 0.95])])
def test_symbol_size_near_empirical_entropy(alphabet, probs):
    from fedcomp.coding.symbols import _HEADER

    rng = np.random.default_rng(1)
    s = rng.choice(alphabet, size=200_000, p=probs)
    blob = encode_symbols(s, alphabet)
    table = 3 * alphabet  # LEB128 counts of up to 2^21
    assert len(blob) <= 1.01 * empirical_entropy_bytes(s, alphabet) + _HEADER.size + table + 8


def test_symbols_fall_back_to_raw_packing_when_smaller():
    s = np.arange(4).repeat(2)  # 8 symbols, 2 bits each: 2 bytes raw beats a count table
    blob = encode_symbols(s, 4)
    assert blob[1] == 0 and len(blob) == 14 + 2


def assert_cuts_raise_and_flips_stay_in_alphabet(blob, alphabet, cuts, flips):
    for cut in cuts:
        with pytest.raises(PayloadError):
            decode_symbols(blob[:cut], alphabet)
    for pos in flips:
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        try:
            out = decode_symbols(bytes(bad), alphabet)
        except PayloadError:
            continue
        assert out.min() >= 0 and out.max() < alphabet


def test_symbol_stream_corruption_is_caught():
    rng = np.random.default_rng(2)
    s = rng.choice(5, size=3000, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    blob = encode_symbols(s, 5)
    assert_cuts_raise_and_flips_stay_in_alphabet(blob, 5, range(len(blob)), range(0, len(blob), 3))


def test_symbol_count_claim_bounded_by_body():
    import struct

    blob = struct.pack("<BBIQ", 1, 1, 2, 2**40) + bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0]) + b"\0\0\0\0"
    with pytest.raises(PayloadError):
        decode_symbols(blob, 2)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=80))
def test_random_symbol_bytes_decode_or_raise(blob):
    try:
        out = decode_symbols(blob)
    except PayloadError:
        return
    assert out.dtype == np.int64


def test_deflate_option_wins_on_runs_and_round_trips():
    s = np.repeat(np.arange(4), 5000)  # long runs: a per-symbol model needs 2 bits each
    plain, deflated = encode_symbols(s, 4), encode_symbols(s, 4, deflate=True)
    assert deflated[1] == 2 and len(deflated) < 0.1 * len(plain)
    assert np.array_equal(decode_symbols(deflated, 4), s)
    for cut in range(len(deflated)):
        with pytest.raises(PayloadError):
            decode_symbols(deflated[:cut], 4)


def test_deflate_bomb_claim_refused():
    import struct
    import zlib

    blob = struct.pack("<BBIQ", 1, 2, 256, 2**40) + zlib.compress(b"\0" * 1000)
    with pytest.raises(PayloadError, match="cannot hold"):
        decode_symbols(blob, 256)


def near_uniform_with_rare(kept_symbols, alphabet, n, rare, seed):
    """Symbols uniform over ``kept_symbols`` except ``rare`` positions holding other symbols."""
    rng = np.random.default_rng(seed)
    s = rng.choice(np.asarray(kept_symbols), size=n)
    others = np.setdiff1d(np.arange(alphabet), kept_symbols)
    if rare and others.size:
        s[rng.choice(n, size=rare, replace=False)] = rng.choice(others, size=rare)
    return s


@pytest.mark.parametrize("kept, alphabet, rare", [([0, 2], 3, 0), ([0, 2], 3, 3), ([1, 2], 3, 10), ([3, 5, 9, 12], 16, 8)])
def test_near_uniform_streams_are_packed_not_range_coded(kept, alphabet, rare):
    from fedcomp.coding.symbols import _HEADER, PACKING_SLACK, SUBSET

    s = near_uniform_with_rare(kept, alphabet, 200_000, rare, seed=3)
    blob = encode_symbols(s, alphabet)
    assert blob[1] == SUBSET
    assert len(blob) - _HEADER.size <= (1 + PACKING_SLACK) * empirical_entropy_bytes(s, alphabet)
    assert np.array_equal(decode_symbols(blob, alphabet, count=s.size), s)
    deflated = encode_symbols(s, alphabet, deflate=True)  # subset packing is a candidate there too
    assert len(deflated) <= len(blob) and np.array_equal(decode_symbols(deflated, alphabet), s)


def test_uniform_binary_stream_is_raw_packed_without_range_coding(monkeypatch):
    from fedcomp.coding import symbols

    monkeypatch.setattr(symbols.constriction.stream.queue, "RangeEncoder", None)  # would fail if called
    s = near_uniform_with_rare([0, 1], 2, 200_000, 0, seed=6)
    blob = encode_symbols(s, 2)
    assert blob[1] == symbols.RAW and np.array_equal(decode_symbols(blob, 2), s)


def test_skewed_streams_still_use_the_range_coder():
    from fedcomp.coding.symbols import RANGE

    s = near_uniform_with_rare([0, 1], 2, 200_000, 0, seed=4)
    s[: 40_000] = 0  # 60/40: the range coder saves 3%, more than the slack
    assert encode_symbols(s, 2)[1] == RANGE


@settings(max_examples=300, deadline=None)
@given(alphabet=st.integers(2, 40), width=st.integers(1, 3), n=st.integers(1, 3000), rare=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_subset_round_trip(alphabet, width, n, rare, seed):
    """The subset format for any kept set and exceptions (the encoder sends it only when it is
    within the slack of the entropy, which short streams seldom are)."""
    from fedcomp.coding.symbols import _HEADER, SUBSET, SYMBOL_CODE_VERSION, _counts, _encode_subset

    kept = np.sort(np.random.default_rng(seed).choice(alphabet, size=min(1 << width, alphabet), replace=False))
    s = near_uniform_with_rare(kept, alphabet, n, min(rare, n - 1), seed)
    body = _encode_subset(s, _counts(s, alphabet), kept, int(kept.size - 1).bit_length())
    blob = _HEADER.pack(SYMBOL_CODE_VERSION, SUBSET, alphabet, n) + body
    assert np.array_equal(decode_symbols(blob, alphabet, count=n), s)


def test_subset_stream_corruption_is_caught():
    from fedcomp.coding.symbols import SUBSET

    s = near_uniform_with_rare([0, 2], 3, 200_000, 3, seed=5)
    blob = encode_symbols(s, 3)
    assert blob[1] == SUBSET
    # Every cut and flip in the headers, kept-symbol table and exceptions; a sample of the packed ranks.
    positions = [*range(120), *range(120, len(blob), 997)]
    assert_cuts_raise_and_flips_stay_in_alphabet(blob, 3, positions, positions)
