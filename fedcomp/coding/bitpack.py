"""Fixed-width bit packing with numpy vector operations (MSB first, no Python loops)."""

from __future__ import annotations

import numpy as np

from fedcomp.wire.errors import PayloadError


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers, each in ``width`` bits (0..64), MSB first, zero-padded."""
    if not 0 <= width <= 64:
        raise ValueError(f"width must be in 0..64, got {width}")
    values = np.asarray(values).astype(np.uint64, copy=False).reshape(-1)
    if width == 0 or values.size == 0:
        return b""
    if width < 64 and values.size and int(values.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits")
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(blob: bytes | memoryview, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``width`` bits as uint64."""
    if not 0 <= width <= 64:
        raise PayloadError(f"bit width {width} outside 0..64")
    if width == 0:
        return np.zeros(count, dtype=np.uint64)
    need = -(-count * width // 8)
    if len(blob) < need:
        raise PayloadError(f"truncated bit field: {count} x {width} bits need {need} bytes, {len(blob)} present")
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8, count=need))[: count * width]
    weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
