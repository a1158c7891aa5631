"""Compressors built from stages: sparsifier -> value codec -> index/symbol coders.

Selection runs where the tensor lives (with ``train.device=cuda``, on the GPU); only the chosen
indices and values move to the CPU to be coded, and random draws come from the CPU generator,
so a payload does not depend on the device.

Payload body (inside the wire frame): flags u8 (bit 0: sparse) | for sparse payloads, the
index blob's length u64 and the Rice-coded indices | the value codec's blob.
"""

from __future__ import annotations

import struct

import torch

from fedcomp.coding import decode_indices, encode_indices
from fedcomp.compression.base import Compressor, check_finite
from fedcomp.compression.quantizers import QSGD, Float32Values, ScaledSign, TernGrad
from fedcomp.compression.registry import register
from fedcomp.compression.selectors import Dense, RandomK, Stochastic, Threshold, TopK, budget
from fedcomp.wire import PayloadError, pack_frame, unpack_frame

_SPARSE = 1
_LEN = struct.Struct("<Q")


class Recipe(Compressor):
    """A sparsifier followed by a value codec, framed and entropy-coded."""

    def __init__(self, selector, values, seed: int = 0) -> None:
        self.selector = selector
        self.values = values
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def set_ratio(self, ratio: float) -> None:
        if not hasattr(self.selector, "ratio"):
            super().set_ratio(ratio)
        budget(1, ratio, None)
        self.selector.ratio, self.selector.k = ratio, None

    def compress(self, x: torch.Tensor) -> bytes:
        return self._encode(x)[0]

    def compress_decoded(self, x: torch.Tensor) -> tuple[bytes, tuple[torch.Tensor | None, torch.Tensor]]:
        """The payload and its decoded (indices, values), without decoding the payload: the
        indices are the selector's (the index code is lossless) and the values are decoded
        from the value blob just written, as ``decompress_sparse`` decodes them."""
        payload, idx, blob, n = self._encode(x)
        return payload, (None if idx is None else idx.cpu(), self.values.decode(blob, n).to(x.dtype))

    def _encode(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor | None, memoryview, int]:
        """(payload, selected indices or None, the value codec's blob, the number of values)."""
        check_finite(x)
        flat = x.detach().reshape(-1).float()
        idx, vals = self.selector.select(flat, self.generator)
        sparse = idx is not None
        body = bytearray([_SPARSE if sparse else 0])
        if sparse:
            blob = encode_indices(idx.cpu().numpy(), flat.numel())
            body += _LEN.pack(len(blob)) + blob
        value_blob = self.values.encode(vals.cpu(), flat, self.generator)
        body += value_blob
        return pack_frame(self.name, x.dtype, tuple(x.shape), body), idx, memoryview(value_blob), vals.numel()

    def decompress(self, payload: bytes, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        frame, idx, vals = self._decode(payload, shape, dtype)
        out = vals if idx is None else torch.zeros(frame.numel, dtype=vals.dtype).index_put_((idx,), vals)
        return out.reshape(frame.shape)

    def decompress_sparse(self, payload: bytes, shape: tuple[int, ...] | None = None,
                          dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        _, idx, vals = self._decode(payload, shape, dtype)
        return idx, vals

    def _decode(self, payload: bytes, shape: tuple[int, ...] | None, dtype: torch.dtype | None):
        """(frame, indices or None, values in the frame's dtype)."""
        frame = unpack_frame(payload, expect=self.name, shape=shape, dtype=dtype)
        body = memoryview(frame.body)
        if not body:
            raise PayloadError("empty compressor body")
        d = frame.numel
        if body[0] == _SPARSE:
            if len(body) < 1 + _LEN.size:
                raise PayloadError("truncated sparse body: no index length")
            (n_idx,) = _LEN.unpack_from(body, 1)
            start = 1 + _LEN.size
            if n_idx > len(body) - start:
                raise PayloadError(f"index blob of {n_idx} bytes overruns the body")
            idx = torch.from_numpy(decode_indices(body[start : start + n_idx], d))
            rest = body[start + n_idx :]
        elif body[0] == 0:
            # Dense bodies carry d values; d was bounded by the frame, values are checked below.
            idx, rest = None, body[1:]
        else:
            raise PayloadError(f"unknown body flags {body[0]}")
        n = d if idx is None else len(idx)
        return frame, idx, self.values.decode(rest, n).to(frame.dtype)


def budget_args(ratio: float | None, k: int | None) -> dict:
    """A sparsifier's budget: an absolute ``k`` when given (it wins over ``ratio``, so a
    config may set ``k: 1000`` beside its default ratio), else ``ratio`` (default 1%)."""
    return {"ratio": None, "k": k} if k is not None else {"ratio": 0.01 if ratio is None else ratio, "k": None}


def _sparse_recipe(name: str, selector_cls, values_factory, doc: str):
    def __init__(self, ratio: float | None = None, k: int | None = None, seed: int = 0) -> None:
        Recipe.__init__(self, selector_cls(**budget_args(ratio, k)), values_factory(), seed)

    cls = type(name, (Recipe,), {"__init__": __init__, "__doc__": doc})
    return cls


TopKCompressor = register("topk")(_sparse_recipe(
    "TopKCompressor", TopK, Float32Values,
    "Top-k by magnitude (Dutta et al.; CAT Eq. 2), values fp32. ratio (fraction of d) or k."))
RandomKCompressor = register("randomk")(_sparse_recipe(
    "RandomKCompressor", RandomK, Float32Values, "k uniformly random coordinates, values fp32."))
@register("sq")
class SQCompressor(Recipe):
    """Sparsification + quantization, CAT Eq. 3: top-T positions, each sent as ||g||_2 sign(g_j)."""

    def __init__(self, ratio: float | None = None, k: int | None = None, deflate: bool = False) -> None:
        super().__init__(TopK(**budget_args(ratio, k)), ScaledSign("full_l2", deflate))
STCCompressor = register("stc")(_sparse_recipe(
    "STCCompressor", TopK, lambda: ScaledSign("mean_abs"),
    "Sparse ternary compression (Sattler et al. 2020): top-k positions, each mu sign(x_j) with mu "
    "the mean magnitude of the kept values; Rice-coded positions. Use with error feedback."))
StochasticCompressor = register("stochastic")(_sparse_recipe(
    "StochasticCompressor", Stochastic, Float32Values,
    "Stochastic sparsification, CAT Eq. 4 with App. F's optimal probabilities (T = ratio x d on average)."))


@register("threshold")
class ThresholdCompressor(Recipe):
    """Threshold-v (Dutta et al.): every |x_j| >= v, values fp32."""

    def __init__(self, v: float = 1e-3) -> None:
        super().__init__(Threshold(v), Float32Values())


@register("terngrad")
class TernGradCompressor(Recipe):
    """TernGrad on the whole tensor: {-s, 0, s} with s = max|x|, stochastic, range-coded."""

    def __init__(self, seed: int = 0, deflate: bool = False) -> None:
        super().__init__(Dense(), TernGrad(deflate), seed)


@register("qsgd")
class QSGDCompressor(Recipe):
    """QSGD with ``levels`` quantization levels (Dutta et al. use 256)."""

    def __init__(self, levels: int = 256, seed: int = 0, deflate: bool = False) -> None:
        super().__init__(Dense(), QSGD(levels, deflate), seed)


@register("signsgd")
class SignSGDCompressor(Recipe):
    """signSGD (Bernstein et al. 2018): sign(x) per coordinate (0 stays 0)."""

    def __init__(self, deflate: bool = False) -> None:
        super().__init__(Dense(), ScaledSign("one", deflate))


@register("scaled_sign")
class ScaledSignCompressor(Recipe):
    """EF-signSGD's compressor (Karimireddy et al. 2019): (||x||_1 / d) sign(x).
    Pair it with error feedback (``error_feedback: true``) for EF-signSGD."""

    def __init__(self, deflate: bool = False) -> None:
        super().__init__(Dense(), ScaledSign("mean_abs", deflate))
