"""Fixed-width bit packing, MSB first, with numpy's packbits/unpackbits.

Each value is written as the low ``width`` bits of the smallest unsigned word that holds
``width`` bits (big-endian, so numpy's bit order is the wire's). Work goes in chunks of
``_CHUNK`` values, so the per-bit intermediate never exceeds a few MB whatever the message
size, and decoding writes straight into an output array of the caller's dtype: nothing is
widened beyond it.
"""

from __future__ import annotations

import numpy as np

from fedcomp.wire.errors import PayloadError

_CHUNK = 1 << 17  # values per step; a multiple of 8, so every chunk ends on a byte boundary


def _word(width: int) -> np.dtype:
    for bits in (8, 16, 32, 64):
        if width <= bits:
            return np.dtype(f">u{bits // 8}")
    raise ValueError(f"width must be in 0..64, got {width}")


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers, each in ``width`` bits (0..64), MSB first, zero-padded."""
    if not 0 <= width <= 64:
        raise ValueError(f"width must be in 0..64, got {width}")
    values = np.asarray(values).reshape(-1)
    if width == 0 or values.size == 0:
        return b""
    if values.min() < 0 or (width < 64 and int(values.max()) >> width):
        raise ValueError(f"a value does not fit in {width} bits")
    word = _word(width)
    top = 8 * word.itemsize - width
    parts = []
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK].astype(word)
        bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, word.itemsize), axis=1)[:, top:]
        parts.append(np.packbits(bits.reshape(-1)).tobytes())
    return b"".join(parts)


def unpack_bits(blob: bytes | memoryview, width: int, count: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``width`` bits, as ``dtype``."""
    if not 0 <= width <= 64:
        raise PayloadError(f"bit width {width} outside 0..64")
    if width == 0:
        return np.zeros(count, dtype=dtype)
    need = -(-count * width // 8)
    if len(blob) < need:
        raise PayloadError(f"truncated bit field: {count} x {width} bits need {need} bytes, {len(blob)} present")
    word = _word(width)
    top = 8 * word.itemsize - width
    spare = word.itemsize - -(-width // 8)  # whole bytes the word has beyond the value's
    data = np.frombuffer(blob, dtype=np.uint8, count=need)
    out = np.empty(count, dtype=dtype)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * width // 8
        bits = np.unpackbits(data[first : first + -(-n * width // 8)])[: n * width].reshape(n, width)
        packed = np.packbits(bits, axis=1)  # each value left-aligned in its bytes
        if spare:
            packed = np.concatenate([packed, np.zeros((n, spare), dtype=np.uint8)], axis=1)
        out[start : start + n] = packed.view(word).reshape(-1) >> word.type(top)
    return out
