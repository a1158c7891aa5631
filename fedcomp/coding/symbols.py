"""Symbol streams: range coding with a model fitted to the message, or raw bit packing.

``encode_symbols`` counts the symbols of the message, writes the counts in the header and
range-codes the symbols (constriction's RangeEncoder) under that categorical model, so the
body is within a fraction of a percent of the message's empirical entropy. When raw packing
at ceil(log2 alphabet) bits per symbol is no larger (tiny or near-uniform messages), it is
used instead; with ``deflate=True`` the raw packing compressed by zlib's deflate is a third
candidate (it can win on messages with repeated runs, which a per-symbol model cannot see).
The method byte says which was used.

Blob layout: version u8 | method u8 | alphabet u32 | count u64 | method body, where the range
body is alphabet x LEB128 counts, then the coder's u32 words (little-endian).

A decoder cannot learn from a range-coded body how many symbols it holds, and a near-certain
symbol costs almost nothing, so a crafted header could claim 2^40 symbols in a few bytes.
Receivers therefore say how many symbols they expect (``count``: they know the tensor's
shape or the mask's size) and a header claiming anything else is refused before any buffer
is made; deflated bodies inflate at most to the size those symbols need. Without ``count``,
the encoder's cap on every probability at 2^(-1/256) (each symbol costs at least 1/256 bit,
binding only when one symbol exceeds 99.7% of the message) still bounds the claim by the
body's length.
"""

from __future__ import annotations

import struct
import zlib

import constriction
import numpy as np

from fedcomp.coding.bitpack import pack_bits, unpack_bits
from fedcomp.wire.errors import PayloadError

SYMBOL_CODE_VERSION = 1
RAW, RANGE, DEFLATE = 0, 1, 2
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
    counts = np.bincount(symbols, minlength=alphabet)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols.astype(np.int32, copy=False), _model(counts))
    ranged = _leb128(counts) + encoder.get_compressed().astype("<u4").tobytes()
    raw_size = -(-symbols.size * width // 8)
    if not deflate:  # raw packing is only worth building when it is the one sent
        method, body = (RANGE, ranged) if len(ranged) < raw_size else (RAW, pack_bits(symbols, width))
        return _HEADER.pack(SYMBOL_CODE_VERSION, method, alphabet, symbols.size) + body
    raw = pack_bits(symbols, width)
    candidates = {RAW: raw, RANGE: ranged, DEFLATE: zlib.compress(raw, 9)}
    method = min(candidates, key=lambda m: len(candidates[m]))
    return _HEADER.pack(SYMBOL_CODE_VERSION, method, alphabet, symbols.size) + candidates[method]


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
