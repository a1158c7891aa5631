"""Sorted-index coding: Rice codes of the gaps between consecutive indices.

A sparsifier's k positions out of d are sent as gaps g_j = i_j - i_{j-1} - 1 (i_0 = -1). For a
random k-subset the gaps are close to geometric with p = k/d, for which a Golomb code is the
optimal prefix code; its power-of-two form (Rice, parameter b) splits each gap into a quotient
g >> b, sent in unary, and b low bits sent verbatim. We keep the two parts in separate streams
(all remainders, fixed width, then all unary quotients) so both directions are numpy vector
operations, and pick b by computing the exact coded size for every candidate -- better than
the closed-form choice from k/d when the gaps are not geometric. Measured on random subsets,
the result is within 1% of log2 C(d, k) for d = 10^6, k = 10^3 and 10^4.

Blob layout: version u8 | b u8 | k u64 | k x b remainder bits (zero-padded to a byte) |
unary quotients (q ones then a zero, per gap), padded with one-bits to a byte.
"""

from __future__ import annotations

import struct

import numpy as np

from fedcomp.coding.bitpack import pack_bits, unpack_bits
from fedcomp.wire.errors import PayloadError

INDEX_CODE_VERSION = 1
_HEADER = struct.Struct("<BBQ")
MAX_D = (1 << 63) - 1


def _gaps(indices: np.ndarray, d: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0 <= d <= MAX_D:
        raise ValueError(f"d must be in [0, 2^63 - 1], got {d}")
    if indices.size:
        if indices[0] < 0 or indices[-1] >= d:
            raise ValueError(f"indices must lie in [0, {d})")
        if np.any(np.diff(indices) <= 0):
            raise ValueError("indices must be sorted and unique")
    return np.diff(indices, prepend=np.int64(-1)) - 1


def index_code_bits(gaps: np.ndarray, b: int) -> int:
    """Bits of the Rice code with parameter ``b`` for these gaps (without header/padding)."""
    return int((gaps >> b).sum()) + gaps.size * (1 + b)


def rice_parameter(gaps: np.ndarray) -> int:
    """The b minimising the coded size of ``gaps`` (the lowest such b; 0 for no gaps).

    The size f(b) = sum(g >> b) + k (1 + b) is convex in b: f(b + 1) - f(b) = k - sum(ceil(q / 2))
    with q = g >> b, and every ceil(q / 2) shrinks as b grows. So the minimum is the first b
    whose step up does not pay, found by walking from the geometric estimate log2(mean gap)
    instead of sizing every b up to the largest gap's bit length (a third of a client's index
    coding at k = 1590 in d = 159k)."""
    if gaps.size == 0:
        return 0
    top = int(gaps.max()).bit_length()

    def rises(b: int) -> bool:  # f(b + 1) >= f(b)
        return b >= top or index_code_bits(gaps, b + 1) >= index_code_bits(gaps, b)

    b = min(top, max(0, int(gaps.mean()).bit_length() - 1))
    if rises(b):
        while b > 0 and rises(b - 1):
            b -= 1
    else:
        while not rises(b):
            b += 1
    return b


def encode_indices(indices: np.ndarray, d: int) -> bytes:
    """Encode sorted unique int64 ``indices`` in [0, d)."""
    gaps = _gaps(indices, d)
    b = rice_parameter(gaps)
    k = gaps.size
    quotients = gaps >> b
    remainders = pack_bits(gaps & ((1 << b) - 1), b)
    # Unary stream: a zero closes each quotient; the ones before it count it.
    ends = np.cumsum(quotients + 1) - 1
    n_bits = int(ends[-1]) + 1 if k else 0
    unary = np.ones(-(-n_bits // 8) * 8, dtype=np.uint8)
    unary[ends] = 0
    return _HEADER.pack(INDEX_CODE_VERSION, b, k) + remainders + np.packbits(unary).tobytes()


def decode_indices(blob: bytes, d: int) -> np.ndarray:
    """Decode :func:`encode_indices` output for a vector of length ``d``; ``PayloadError``
    on any inconsistency. Memory is bounded by the blob's own length."""
    if len(blob) < _HEADER.size:
        raise PayloadError(f"index blob of {len(blob)} bytes is shorter than its {_HEADER.size}-byte header")
    version, b, k = _HEADER.unpack_from(blob)
    if version != INDEX_CODE_VERSION:
        raise PayloadError(f"unsupported index code version {version}")
    if k > d:
        raise PayloadError(f"index blob claims k={k} indices out of d={d}")
    if b > 62:
        raise PayloadError(f"Rice parameter {b} out of range")
    body = memoryview(blob)[_HEADER.size :]
    rem_bytes = -(-k * b // 8)
    # Every index costs at least one unary bit, so k is bounded by the bytes present.
    if rem_bytes > len(body) or k > 8 * (len(body) - rem_bytes):
        raise PayloadError(f"truncated index blob: k={k}, b={b} cannot fit in {len(body)} bytes")
    if k == 0:
        if len(body):
            raise PayloadError("trailing bytes after an empty index set")
        return np.zeros(0, dtype=np.int64)
    remainders = unpack_bits(body[:rem_bytes], b, k)
    unary = np.unpackbits(np.frombuffer(body[rem_bytes:], dtype=np.uint8))
    zeros = np.flatnonzero(unary == 0)
    if zeros.size < k:
        raise PayloadError(f"truncated index blob: {zeros.size} of {k} gap codes present")
    tail = unary.size - 1 - zeros[k - 1]
    if zeros.size > k or tail >= 8:
        raise PayloadError("index blob has bytes after its last gap code")
    quotients = np.diff(zeros[:k], prepend=np.int64(-1)) - 1
    if quotients.max() > (d >> b):
        raise PayloadError("index gap exceeds d")
    gaps = (quotients << b) | remainders
    indices = np.cumsum(gaps + 1) - 1
    # A gap that overflowed int64 shows up as a decrease; anything else must stay inside [0, d).
    if indices[0] < 0 or indices[-1] >= d or (k > 1 and np.any(np.diff(indices) <= 0)):
        raise PayloadError(f"decoded indices leave [0, {d})")
    return indices
