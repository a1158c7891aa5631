"""Versioned frame around every compressed tensor.

Layout (little-endian)::

    magic  b"FCMP"      4 bytes
    version             u8   (FRAME_VERSION)
    codec name length   u8, then that many ASCII bytes
    dtype code          u8   (see DTYPES)
    ndim                u8, then ndim x u64 dims
    body length         u64, then the body
    crc32               u32 over everything before it

The frame says what the body is (codec), which tensor it rebuilds (dtype, shape) and how long
it is, so a decoder never has to trust a length it has not checked against the bytes it holds.
The CRC turns random corruption into a clear error instead of a silently wrong tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
from isal.isal_zlib import crc32  # zlib's CRC-32, bit for bit, at memory speed (zlib's: ~4 GB/s)

from fedcomp.wire.errors import PayloadError

MAGIC = b"FCMP"
FRAME_VERSION = 1
MAX_NDIM = 16
# Largest tensor a frame may describe (2^28 values = 1 GiB as fp32; ResNet-18 has 2^23.4).
# A sparse payload's size says nothing about its tensor's, so this caps what a decoder will
# allocate for a crafted header. Raise it here for larger models.
MAX_NUMEL = 1 << 28

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Frame:
    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    body: memoryview  # read-only view into the received payload: no copy until a decoder needs one

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


Body = bytes | bytearray | memoryview | np.ndarray  # any C-contiguous buffer


def pack_frame(codec: str, dtype: torch.dtype, shape: tuple[int, ...], body: Body | list[Body] | tuple[Body, ...]) -> bytes:
    """The frame around ``body``: one buffer, or the concatenation of a sequence of them (each
    copied once, into the frame: a body made of large arrays need not be joined first)."""
    parts = [memoryview(part).cast("B") for part in (body if isinstance(body, (list, tuple)) else (body,))]
    name = codec.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError(f"codec name must be 1..255 ASCII bytes, got {codec!r}")
    if dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported dtype {dtype}; supported: {list(DTYPE_CODES)}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions, got {len(shape)}")
    head = (
        MAGIC
        + struct.pack("<BB", FRAME_VERSION, len(name))
        + name
        + struct.pack("<BB", DTYPE_CODES[dtype], len(shape))
        + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack("<Q", sum(len(part) for part in parts))
    )
    crc = crc32(head)
    for part in parts:
        crc = crc32(part, crc)
    return b"".join((head, *parts, struct.pack("<I", crc)))


class _Reader:
    """Cursor over untrusted bytes: every read checks that the bytes are there."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise PayloadError(
                f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def unpack_frame(
    payload: bytes, expect: str | None = None, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
) -> Frame:
    """Parse and check a frame; with ``expect``, also that it holds that codec, and with
    ``shape`` / ``dtype`` that it describes the tensor the receiver expects -- checked before
    the body is copied or anything sized by the header is allocated."""
    r = _Reader(payload)
    if bytes(r.take(4, "magic")) != MAGIC:
        raise PayloadError("not a fedcomp payload (bad magic bytes)")
    version, name_len = r.unpack("<BB", "header")
    if version != FRAME_VERSION:
        raise PayloadError(f"unsupported frame version {version} (this build reads {FRAME_VERSION})")
    try:
        codec = bytes(r.take(name_len, "codec name")).decode("ascii")
    except UnicodeDecodeError as exc:
        raise PayloadError("codec name is not ASCII") from exc
    dtype_code, ndim = r.unpack("<BB", "dtype/ndim")
    if dtype_code not in DTYPES:
        raise PayloadError(f"unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise PayloadError(f"ndim {ndim} exceeds {MAX_NDIM}")
    shape_read = r.unpack(f"<{ndim}Q", "shape")
    numel = 1
    for s in shape_read:
        numel *= s
        if numel > MAX_NUMEL:
            raise PayloadError(f"shape {shape_read} describes more than {MAX_NUMEL} elements")
    if shape is not None and tuple(shape) != tuple(int(s) for s in shape_read):
        raise PayloadError(f"payload describes a tensor of shape {tuple(shape_read)}, expected {tuple(shape)}")
    if dtype is not None and DTYPES[dtype_code] != dtype:
        raise PayloadError(f"payload describes a {DTYPES[dtype_code]} tensor, expected {dtype}")
    (body_len,) = r.unpack("<Q", "body length")
    body = r.take(body_len, "body")
    crc_end = r.pos
    (crc,) = r.unpack("<I", "checksum")
    if r.pos != len(payload):
        raise PayloadError(f"{len(payload) - r.pos} unexpected trailing bytes after the frame")
    if crc32(r.data[:crc_end]) != crc:
        raise PayloadError("checksum mismatch: payload corrupted")
    if expect is not None and codec != expect:
        raise PayloadError(f"payload holds codec {codec!r}, expected {expect!r}")
    return Frame(codec, DTYPES[dtype_code], tuple(shape_read), body.toreadonly())


def frame_codec(payload: bytes) -> str:
    """The codec name a payload's header states (unchecked; for accounting, not decoding)."""
    if len(payload) < 6 or payload[:4] != MAGIC:
        return "unknown"
    return bytes(payload[6 : 6 + payload[5]]).decode("ascii", "replace")
