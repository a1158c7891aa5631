"""Fixed-width bit packing, MSB first, with numpy's packbits/unpackbits.

Width 1 is numpy's packbits itself. Widths up to 8 (ternary and most level symbols) take a
word-parallel path: eight values are shifted into one 64-bit word whose low ``width`` bytes are
exactly their bit string, so each value costs a few vector operations instead of 8 unpacked
bytes. Wider values are written as the low ``width`` bits of the smallest unsigned word that
holds them (big-endian, so numpy's bit order is the wire's) through unpackbits/packbits. Work
goes in chunks of ``_CHUNK`` values, so intermediates stay a few MB whatever the message size,
and decoding writes straight into an output array of the caller's dtype.
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
    if width == 1:  # one bit per value is numpy's own packing
        return np.packbits(values.astype(bool, copy=False)).tobytes()
    if width <= 8:
        return b"".join(_pack_octets(values[start : start + _CHUNK], width) for start in range(0, values.size, _CHUNK))[
            : -(-values.size * width // 8)
        ]
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
    data = np.frombuffer(blob, dtype=np.uint8, count=need)
    if width == 1:
        return np.unpackbits(data, count=count).astype(dtype, copy=False)
    if width <= 8:
        out = np.empty(count, dtype=dtype)
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            first = start * width // 8
            out[start : start + n] = _unpack_octets(data[first : first + -(-n * width // 8)], width, n)
        return out
    word = _word(width)
    top = 8 * word.itemsize - width
    spare = word.itemsize - -(-width // 8)  # whole bytes the word has beyond the value's
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


def _pack_octets(values: np.ndarray, width: int) -> bytes:
    """Eight values of ``width`` <= 8 bits per 64-bit word, whose low ``width`` bytes (big-endian)
    are their bit string; a partial last octet is zero-padded (the caller trims the bytes)."""
    groups = -(-values.size // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[: values.size] = values
    octets = padded.reshape(groups, 8)
    word = octets[:, 0] << np.uint64(7 * width)
    for j in range(1, 8):
        word |= octets[:, j] << np.uint64((7 - j) * width)
    return word.astype(">u8").view(np.uint8).reshape(groups, 8)[:, 8 - width :].tobytes()


def _unpack_octets(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_octets` for ``count`` values from their (possibly short) bytes."""
    groups = -(-count // 8)
    packed = np.zeros(groups * width, dtype=np.uint8)
    packed[: data.size] = data
    octet_bytes = np.zeros((groups, 8), dtype=np.uint8)
    octet_bytes[:, 8 - width :] = packed.reshape(groups, width)
    word = octet_bytes.view(">u8").reshape(groups).astype(np.uint64)
    mask = np.uint64((1 << width) - 1)
    values = np.empty((groups, 8), dtype=np.uint64)
    for j in range(8):
        values[:, j] = (word >> np.uint64((7 - j) * width)) & mask
    return values.reshape(-1)[:count]
