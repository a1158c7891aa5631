"""Dense compressors: the tensor's values, cast to a (possibly narrower) float type."""

from __future__ import annotations

import numpy as np
import torch

from fedcomp.compression.base import Compressor, check_finite
from fedcomp.compression.registry import register
from fedcomp.wire import PayloadError, pack_frame, unpack_frame


class _Cast(Compressor):
    """Send every value as ``wire_dtype`` (little-endian); the frame records the original dtype."""

    wire_dtype: torch.dtype
    # numpy spelling of the wire words; bfloat16 has no numpy dtype, so its raw 16-bit words move.
    wire_words: str

    def compress(self, x: torch.Tensor) -> bytes:
        check_finite(x)
        values = x.detach().to("cpu", self.wire_dtype).contiguous().reshape(-1)
        # bfloat16 has no numpy dtype: move its raw 16-bit words instead.
        raw = values.view(torch.int16) if self.wire_dtype == torch.bfloat16 else values
        body = np.asarray(raw.numpy(), dtype=self.wire_words)  # a view on little-endian hosts; pack_frame copies it once
        return pack_frame(self.name, x.dtype, tuple(x.shape), body)

    def decompress(self, payload: bytes, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        frame = unpack_frame(payload, expect=self.name, shape=shape, dtype=dtype)
        itemsize = np.dtype(self.wire_words).itemsize
        if len(frame.body) != frame.numel * itemsize:
            raise PayloadError(
                f"{self.name} body is {len(frame.body)} bytes, shape {frame.shape} needs "
                f"{frame.numel * itemsize}"
            )
        words = np.frombuffer(frame.body, dtype=self.wire_words)
        raw = torch.from_numpy(words.astype(words.dtype.newbyteorder("=")))
        values = raw.view(torch.bfloat16) if self.wire_dtype == torch.bfloat16 else raw
        return values.to(frame.dtype).reshape(frame.shape)


@register("identity")
class Identity(_Cast):
    """Uncompressed fp32: the FedAvg baseline every byte count is compared against."""

    wire_dtype = torch.float32
    wire_words = "<f4"


@register("fp16")
class Float16(_Cast):
    wire_dtype = torch.float16
    wire_words = "<f2"


@register("bf16")
class BFloat16(_Cast):
    wire_dtype = torch.bfloat16
    wire_words = "<i2"
