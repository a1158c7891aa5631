"""Value codecs: how the selected values travel (raw, or quantized then entropy-coded).

``encode(values, full, generator) -> bytes`` sees the selected values and the whole vector
(S+Q scales by the whole gradient's norm); ``decode(blob, n) -> values`` rebuilds n values.
Quantized symbols go through ``fedcomp.coding.encode_symbols`` (range coder or raw packing).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from fedcomp.coding import decode_symbols, encode_symbols
from fedcomp.wire.errors import PayloadError

_F32 = struct.Struct("<f")


def _read_scale(blob: memoryview, what: str) -> float:
    if len(blob) < _F32.size:
        raise PayloadError(f"truncated {what}: no scale")
    (scale,) = _F32.unpack_from(blob)
    if not np.isfinite(scale) or scale < 0:
        raise PayloadError(f"{what} scale {scale} is not a finite non-negative number")
    return scale


def _pack_ternary(scale: float, ternary: torch.Tensor, deflate: bool) -> bytes:
    """One scale and symbols {-1, 0, 1} (sent as 0, 1, 2), made in int8: a quarter of int32's traffic."""
    return _F32.pack(scale) + encode_symbols(ternary.to(torch.int8).add_(1).numpy(), 3, deflate)


def _unpack_ternary(blob: memoryview, n: int, what: str) -> torch.Tensor:
    s = _read_scale(blob, what)
    symbols = _symbols(blob[_F32.size :], 3, n, what)
    return _lookup(symbols, np.array([-1.0, 0.0, 1.0], dtype=np.float32) * np.float32(s))


def _lookup(symbols: np.ndarray, table: np.ndarray) -> torch.Tensor:
    """Each decoded symbol's float32 value: one gather instead of per-coordinate arithmetic."""
    return torch.from_numpy(table.astype(np.float32)[symbols])


def _symbols(blob: memoryview, alphabet: int, n: int, what: str) -> np.ndarray:
    """Exactly n symbols (a stream claiming another count is refused before decoding)."""
    try:
        return decode_symbols(blob, alphabet, count=n)
    except PayloadError as exc:
        raise PayloadError(f"{what}: {exc}") from None


class Float32Values:
    """Values as little-endian float32."""

    def encode(self, values: torch.Tensor, full: torch.Tensor, generator: torch.Generator | None) -> bytes:
        return values.numpy().astype("<f4").tobytes()

    def decode(self, blob: memoryview, n: int) -> torch.Tensor:
        if len(blob) != 4 * n:
            raise PayloadError(f"float32 values: {len(blob)} bytes for {n} values")
        return torch.from_numpy(np.frombuffer(blob, dtype="<f4").astype(np.float32))


class ScaledSign:
    """scale x sign(v_j), sent as one float and a ternary symbol stream {-, 0, +}.

    ``scale``: ``one`` (signSGD), ``mean_abs`` (EF-signSGD's ||v||_1 / n, Karimireddy et al.
    2019), ``full_l2`` (S+Q, CAT Eq. 3: ||g||_2 of the whole vector). ``deflate`` lets the
    symbol coder also try deflate (see ``fedcomp.coding.symbols``)."""

    def __init__(self, scale: str, deflate: bool = False) -> None:
        if scale not in ("one", "mean_abs", "full_l2"):
            raise ValueError(f"unknown sign scale {scale!r}")
        self.scale = scale
        self.deflate = deflate

    def encode(self, values: torch.Tensor, full: torch.Tensor, generator: torch.Generator | None) -> bytes:
        if self.scale == "one":
            s = 1.0
        elif self.scale == "mean_abs":
            s = float(values.abs().mean()) if values.numel() else 0.0
        else:
            s = float(full.cpu().double().norm())  # on the CPU: the sum's rounding must not depend on the device
        return _pack_ternary(s, torch.sign(values), self.deflate)

    def decode(self, blob: memoryview, n: int) -> torch.Tensor:
        return _unpack_ternary(blob, n, "sign values")


class TernGrad:
    """TernGrad (Wen et al. 2017): s = max|v|; v_j -> s sign(v_j) b_j, b_j ~ Bernoulli(|v_j| / s);
    unbiased. (The paper's gradient clipping is left to the training loop.)"""

    def __init__(self, deflate: bool = False) -> None:
        self.deflate = deflate

    def encode(self, values: torch.Tensor, full: torch.Tensor, generator: torch.Generator | None) -> bytes:
        s = float(values.abs().max()) if values.numel() else 0.0
        keep = torch.rand(values.numel(), generator=generator) < (values.abs() / s if s > 0 else torch.zeros_like(values))
        return _pack_ternary(s, torch.sign(values) * keep, self.deflate)

    def decode(self, blob: memoryview, n: int) -> torch.Tensor:
        return _unpack_ternary(blob, n, "TernGrad values")


class QSGD:
    """QSGD (Alistarh et al. 2017) with s levels: v_j -> ||v||_2 sign(v_j) l_j / s, where l_j
    rounds s|v_j|/||v||_2 up or down at random so the result is unbiased. Symbols
    sign x level + s in [0, 2s] are range-coded (QSGD's Elias coding, done better)."""

    def __init__(self, levels: int = 256, deflate: bool = False) -> None:
        if not 1 <= levels <= 32767:
            raise ValueError(f"levels must be in 1..32767, got {levels}")
        self.levels = levels
        self.deflate = deflate

    def encode(self, values: torch.Tensor, full: torch.Tensor, generator: torch.Generator | None) -> bytes:
        norm = float(torch.linalg.vector_norm(values, dtype=torch.float64))
        # floor(s|v|/norm + u), u ~ U[0,1), rounds up with probability equal to the fraction:
        # the unbiased rounding in one pass, in float32 (24 bits hold s <= 32767 with >= 9 bits
        # of fraction, below the rounding noise).
        level = values.abs().mul_(self.levels / norm) if norm > 0 else torch.zeros_like(values)
        level.add_(torch.rand(values.numel(), generator=generator)).floor_().clamp_(max=self.levels)
        symbols = level.mul_(torch.sign(values)).add_(self.levels).to(torch.int32).numpy()
        return _F32.pack(norm) + struct.pack("<H", self.levels) + encode_symbols(symbols, 2 * self.levels + 1, self.deflate)

    def decode(self, blob: memoryview, n: int) -> torch.Tensor:
        norm = _read_scale(blob, "QSGD values")
        if len(blob) < _F32.size + 2:
            raise PayloadError("truncated QSGD values: no level count")
        (levels,) = struct.unpack_from("<H", blob, _F32.size)
        if not 1 <= levels <= 32767:
            raise PayloadError(f"QSGD level count {levels} out of range")
        symbols = _symbols(blob[_F32.size + 2 :], 2 * levels + 1, n, "QSGD values")
        return _lookup(symbols, (np.arange(2 * levels + 1) - levels) * (norm / levels))
