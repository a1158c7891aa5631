"""Symbol streams: range coding with a model fitted to the message, or bit packing.

``encode_symbols`` counts the symbols of the message, writes the counts in the header and
range-codes the symbols (constriction's RangeEncoder) under that categorical model, so the
body is within a fraction of a percent of the message's empirical entropy. When raw packing
at ceil(log2 alphabet) bits per symbol is no larger (tiny or near-uniform messages), it is
used instead; with ``deflate=True`` the raw packing compressed by zlib's deflate is a third
candidate (it can win on messages with repeated runs, which a per-symbol model cannot see).
A fourth method packs each symbol's rank among the 2^w most frequent symbols at w bits, and
lists the others as exceptions (Rice-coded positions, raw symbols): signs with rare zeros in a
ternary alphabet cost one bit each plus the zeros' positions. When raw or subset packing is
within ``PACKING_SLACK`` (0.1%) of the message's entropy bound, the range coder could save at
most that much and is not run: range-coding a near-uniform stream takes several times as long
as packing it (signSGD's and EF-signSGD's signs). The method byte says which was used.

Blob layout: version u8 | method u8 | alphabet u32 | count u64 | method body, where the range
body is alphabet x LEB128 counts, then the coder's u32 words (little-endian), and the subset body
is LEB128 m >= 2 (the kept symbols) and their gaps (each symbol minus the previous one minus one,
from -1), LEB128 e (exceptions) and, when e > 0, the exceptions' index blob's length (LEB128), the
blob (``fedcomp.coding.indices``) and their symbols raw; then every symbol's rank among the kept
ones at ceil(log2 m) bits (0 at an exception).

A decoder cannot learn from a range-coded body how many symbols it holds, and a near-certain
symbol costs almost nothing, so a crafted header could claim 2^40 symbols in a few bytes.
Receivers therefore say how many symbols they expect (``count``: they know the tensor's
shape or the mask's size) and a header claiming anything else is refused before any buffer
is made; deflated bodies inflate at most to the size those symbols need. Without ``count``,
the encoder's cap on every probability at 2^(-1/256) (each symbol costs at least 1/256 bit,
binding only when one symbol exceeds 99.7% of the message) still bounds the claim by the
body's length; raw and subset bodies spend at least one bit per symbol.
"""

from __future__ import annotations

import struct
import zlib

import constriction
import numpy as np

from fedcomp.coding.bitpack import pack_bits, unpack_bits
from fedcomp.coding.indices import decode_indices, encode_indices
from fedcomp.wire.errors import PayloadError

SYMBOL_CODE_VERSION = 1
RAW, RANGE, DEFLATE, SUBSET = 0, 1, 2, 3
PACKING_SLACK = 1e-3
# zlib expands at most ~1032:1; a deflated body claiming more than this is refused unread.
_MAX_INFLATE = 1100
_HEADER = struct.Struct("<BBIQ")
MAX_ALPHABET = 1 << 16
MIN_BITS_PER_SYMBOL = 1 / 256
_P_MAX = 2.0 ** (-MIN_BITS_PER_SYMBOL)


def symbol_width(alphabet: int) -> int:
    return max(0, int(alphabet - 1).bit_length())


def _leb128(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _read_leb128(data: memoryview, pos: int, n: int) -> tuple[list[int], int]:
    values = []
    for _ in range(n):
        v = shift = 0
        while True:
            if pos >= len(data):
                raise PayloadError("truncated symbol-count table")
            byte = data[pos]
            pos += 1
            v |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                raise PayloadError("symbol count overflows 64 bits")
        values.append(v)
    return values, pos


def _model(counts: np.ndarray) -> "constriction.stream.model.Categorical":
    p = counts / counts.sum()
    # Cap the largest probability (see module doc); the excess goes to the other symbols.
    top = int(np.argmax(p))
    if p[top] > _P_MAX:
        p = p * ((1 - _P_MAX) / (1 - p[top])) if p[top] < 1 else np.full_like(p, (1 - _P_MAX) / max(len(p) - 1, 1))
        p[top] = _P_MAX
    return constriction.stream.model.Categorical(p.astype(np.float64), perfect=False)


def _entropy_bytes(counts: np.ndarray) -> float:
    """The message's empirical entropy in bytes: no coder with a per-symbol model goes below it."""
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(p)).sum()) / 8


def _subset_plan(counts: np.ndarray, width: int) -> tuple[np.ndarray, int, float]:
    """The kept symbols (the 2^w most frequent, sorted), w, and the estimated body size in bytes,
    for the w < ``width`` that minimises it (each exception ~ its Rice-coded gap plus its symbol)."""
    n = int(counts.sum())
    order = np.argsort(-counts, kind="stable")
    best = (order[:0], 0, float("inf"))
    for w in range(1, width):
        kept = np.sort(order[: 1 << w])
        e = n - int(counts[kept].sum())
        # + the kept-symbol table, and with exceptions the index blob's 10-byte header and lengths
        size = (n * w + e * (np.log2(n / e) + 2 + width if e else 0)) / 8 + len(kept) + (16 if e else 2)
        if size < best[2]:
            best = (kept, w, size)
    return best


def _encode_subset(symbols: np.ndarray, counts: np.ndarray, kept: np.ndarray, w: int) -> bytes:
    alphabet = counts.size
    others = np.setdiff1d(np.flatnonzero(counts), kept)
    out = bytearray(_leb128(np.concatenate([[len(kept)], np.diff(kept, prepend=-1) - 1, [counts[others].sum()]])))
    if others.size:
        # Exceptions are rare by construction: a comparison per absent symbol beats a gather.
        outside = np.zeros(alphabet, dtype=bool)
        outside[others] = True
        mask = symbols == others[0] if others.size == 1 else np.take(outside, symbols)
        exceptions = np.flatnonzero(mask)
        positions = encode_indices(exceptions, symbols.size)
        out += _leb128(np.array([len(positions)])) + positions + pack_bits(symbols[exceptions], symbol_width(alphabet))
    # One bit per symbol: the rank is "is the second kept symbol" (0 at exceptions), no gather.
    if w == 1:
        ranks = symbols == kept[1]
    else:
        rank = np.zeros(alphabet, dtype=np.uint8 if w <= 8 else np.int64)
        rank[kept] = np.arange(len(kept))
        ranks = np.take(rank, symbols)
    return bytes(out + pack_bits(ranks, w))


def _counts(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Occurrences of each symbol; a comparison per symbol for small alphabets, where bincount's
    conversion to intp costs more."""
    if alphabet <= 8:
        return np.array([np.count_nonzero(symbols == v) for v in range(alphabet)], dtype=np.int64)
    return np.bincount(symbols, minlength=alphabet)


def encode_symbols(symbols: np.ndarray, alphabet: int, deflate: bool = False) -> bytes:
    """Encode integers in [0, alphabet) compactly; see the module doc for the format."""
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet must be in 1..{MAX_ALPHABET}, got {alphabet}")
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    header = _HEADER.pack(SYMBOL_CODE_VERSION, RAW, alphabet, symbols.size)
    width = symbol_width(alphabet)
    if alphabet == 1 or symbols.size == 0:
        return header + pack_bits(symbols, width)
    counts = _counts(symbols, alphabet)
    # A packing this close to the entropy is sent without running the range coder (module doc).
    good_enough = (1 + PACKING_SLACK) * _entropy_bytes(counts)
    sizes, bodies = {RAW: -(-symbols.size * width // 8)}, {}
    if not deflate and sizes[RAW] <= good_enough:
        return header + pack_bits(symbols, width)
    kept, w, estimate = _subset_plan(counts, width)
    if estimate <= min(sizes[RAW], good_enough):
        bodies[SUBSET] = _encode_subset(symbols, counts, kept, w)
        sizes[SUBSET] = len(bodies[SUBSET])
        if not deflate and sizes[SUBSET] <= min(sizes[RAW], good_enough):
            return _HEADER.pack(SYMBOL_CODE_VERSION, SUBSET, alphabet, symbols.size) + bodies[SUBSET]
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols.astype(np.int32, copy=False), _model(counts))
    bodies[RANGE] = _leb128(counts) + encoder.get_compressed().astype("<u4").tobytes()
    sizes[RANGE] = len(bodies[RANGE])
    if deflate:
        bodies[RAW] = pack_bits(symbols, width)
        bodies[DEFLATE] = zlib.compress(bodies[RAW], 9)
        sizes[DEFLATE] = len(bodies[DEFLATE])
    # Ties keep the earlier method (raw, range, deflate, subset); raw packing is built only when sent.
    method = min(sorted(sizes), key=sizes.get)
    if method not in bodies:
        bodies[method] = pack_bits(symbols, width)
    return _HEADER.pack(SYMBOL_CODE_VERSION, method, alphabet, symbols.size) + bodies[method]


def decode_symbols(blob: bytes | memoryview, alphabet: int | None = None, count: int | None = None) -> np.ndarray:
    """Decode :func:`encode_symbols` output to int64 symbols. ``alphabet`` and ``count``, if
    given, must match the header (checked before anything is allocated). Raises
    ``PayloadError`` on malformed input."""
    data = memoryview(blob)
    if len(data) < _HEADER.size:
        raise PayloadError(f"symbol blob of {len(data)} bytes is shorter than its header")
    version, method, size, claimed = _HEADER.unpack_from(data)
    if version != SYMBOL_CODE_VERSION:
        raise PayloadError(f"unsupported symbol code version {version}")
    if not 1 <= size <= MAX_ALPHABET or (alphabet is not None and size != alphabet):
        raise PayloadError(f"symbol alphabet {size} is not the expected {alphabet}")
    if count is not None and claimed != count:
        raise PayloadError(f"symbol stream claims {claimed} symbols, {count} expected")
    count = claimed
    body = data[_HEADER.size :]
    if method == DEFLATE:
        expected = -(-count * symbol_width(size) // 8)
        if expected > _MAX_INFLATE * len(body) + 64:
            raise PayloadError(f"deflated body of {len(body)} bytes cannot hold {count} symbols")
        inflater = zlib.decompressobj()
        try:
            body = memoryview(inflater.decompress(body, expected))
        except zlib.error as exc:
            raise PayloadError(f"corrupt deflated symbols: {exc}") from None
        if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
            raise PayloadError("deflated symbol body does not end where its symbols do")
        method = RAW
    if method == RAW:
        width = symbol_width(size)
        if width == 0:
            if len(body) or count > 1 << 40:
                raise PayloadError("malformed single-symbol stream")
            return np.zeros(count, dtype=np.int64)
        if len(body) != -(-count * width // 8):
            raise PayloadError(f"raw symbol body is {len(body)} bytes, {count} x {width} bits need {-(-count * width // 8)}")
        out = unpack_bits(body, width, count)
        if out.size and out.max() >= size:
            raise PayloadError("raw symbol outside the alphabet")
        return out
    if method == SUBSET:
        return _decode_subset(body, size, count)
    if method != RANGE:
        raise PayloadError(f"unknown symbol coding method {method}")
    counts, pos = _read_leb128(body, 0, size)
    words = body[pos:]
    if sum(counts) != count or count == 0:
        raise PayloadError("symbol counts do not add up to the message length")
    if len(words) % 4 or count > (len(words) * 8 + 64) / MIN_BITS_PER_SYMBOL:
        raise PayloadError(f"range-coded body of {len(words)} bytes cannot hold {count} symbols")
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
        out = decoder.decode(_model(np.asarray(counts, dtype=np.float64)), count).astype(np.int64)
    except Exception as exc:  # constriction reports corrupt streams with its own error types
        raise PayloadError(f"corrupt range-coded symbols: {exc}") from None
    if not np.array_equal(np.bincount(out, minlength=size), counts):
        raise PayloadError("decoded symbols do not match their counts (corrupted stream)")
    return out


def _decode_subset(body: memoryview, alphabet: int, count: int) -> np.ndarray:
    (m,), pos = _read_leb128(body, 0, 1)
    if not 2 <= m <= alphabet:
        raise PayloadError(f"symbol subset of {m} symbols in an alphabet of {alphabet}")
    gaps, pos = _read_leb128(body, pos, m)
    kept, symbol = [], -1
    for gap in gaps:
        symbol += gap + 1
        kept.append(symbol)
    if kept[-1] >= alphabet:
        raise PayloadError("symbol subset names a symbol outside the alphabet")
    (e,), pos = _read_leb128(body, pos, 1)
    if e >= count:
        raise PayloadError(f"{e} exceptions among {count} symbols")
    positions = np.zeros(0, dtype=np.int64)
    if e:
        (n_pos,), pos = _read_leb128(body, pos, 1)
        if n_pos > len(body) - pos:
            raise PayloadError(f"exception index blob of {n_pos} bytes overruns the body")
        positions = decode_indices(body[pos : pos + n_pos], count)
        if positions.size != e:
            raise PayloadError(f"{positions.size} exception positions, {e} announced")
        pos += n_pos
        exc_bytes = -(-e * symbol_width(alphabet) // 8)
        if exc_bytes > len(body) - pos:
            raise PayloadError("truncated exception symbols")
        exceptions = unpack_bits(body[pos : pos + exc_bytes], symbol_width(alphabet), e)
        if exceptions.max() >= alphabet:
            raise PayloadError("exception symbol outside the alphabet")
        pos += exc_bytes
    w = symbol_width(m)
    if len(body) - pos != -(-count * w // 8):
        raise PayloadError(f"subset symbol body is {len(body) - pos} bytes, {count} x {w} bits need {-(-count * w // 8)}")
    ranks = unpack_bits(body[pos:], w, count)
    if ranks.max() >= m:
        raise PayloadError("subset rank outside the kept symbols")
    out = np.asarray(kept, dtype=np.int64)[ranks]
    if e:
        out[positions] = exceptions
    return out
