"""Scope (Dutta et al. Algorithm 1): compress the entire model as one vector, or each layer
(tensor of the state dict) on its own with its own compressor instance and state.

Layer-wise payload body: count u32 | per layer, length u64 then that layer's payload.
"""

from __future__ import annotations

import struct
from typing import Callable

import torch

from fedcomp.compression.base import Compressor, check_finite
from fedcomp.wire import PayloadError, pack_frame, unpack_frame

_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")


class Layerwise(Compressor):
    """Applies one compressor per segment of a flat vector (segments = layer sizes)."""

    def __init__(self, make: Callable[[], Compressor], sizes: list[int]) -> None:
        if not sizes or min(sizes) < 0:
            raise ValueError("layer-wise scope needs the model's layer sizes")
        self.sizes = list(sizes)
        self.parts = [make() for _ in sizes]
        self.name = f"layerwise.{self.parts[0].name}"

    def compress(self, x: torch.Tensor) -> bytes:
        check_finite(x)
        flat = x.detach().reshape(-1)
        if flat.numel() != sum(self.sizes):
            raise ValueError(f"layer-wise scope expects {sum(self.sizes)} values, got {flat.numel()}")
        body = bytearray(_COUNT.pack(len(self.sizes)))
        for part, chunk in zip(self.parts, torch.split(flat, self.sizes)):
            payload = part.compress(chunk)
            body += _LEN.pack(len(payload)) + payload
        return pack_frame(self.name, x.dtype, tuple(x.shape), body)

    def decompress(self, payload: bytes, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        frame = unpack_frame(payload, expect=self.name, shape=shape, dtype=dtype)
        body = memoryview(frame.body)
        if len(body) < _COUNT.size or _COUNT.unpack_from(body)[0] != len(self.sizes):
            raise PayloadError(f"layer-wise payload does not hold {len(self.sizes)} layers")
        if frame.numel != sum(self.sizes):
            raise PayloadError(f"layer-wise payload describes {frame.numel} values, expected {sum(self.sizes)}")
        pos, chunks = _COUNT.size, []
        for part, size in zip(self.parts, self.sizes):
            if len(body) - pos < _LEN.size:
                raise PayloadError("truncated layer-wise payload")
            (n,) = _LEN.unpack_from(body, pos)
            pos += _LEN.size
            if n > len(body) - pos:
                raise PayloadError("layer payload overruns the layer-wise body")
            chunk = part.decompress(bytes(body[pos : pos + n]), (size,)).reshape(-1)
            chunks.append(chunk.float())
            pos += n
        if pos != len(body):
            raise PayloadError("trailing bytes after the last layer")
        return torch.cat(chunks).reshape(frame.shape).to(frame.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.parts):
            p.load_state({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})

    def reseed(self, seed: int) -> None:
        for i, p in enumerate(self.parts):
            p.reseed(seed * 1_000_003 + i)

    def set_round(self, server_round: int) -> None:
        for p in self.parts:
            p.set_round(server_round)

    def set_ratio(self, ratio: float) -> None:
        for p in self.parts:
            p.set_ratio(ratio)

    def take_momentum(self, momentum: float) -> bool:
        return all([p.take_momentum(momentum) for p in self.parts])
