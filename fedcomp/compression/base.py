"""The compressor interface every scheme implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Compressor(ABC):
    """Turns a tensor into self-describing bytes and back.

    ``decompress(compress(x))`` has the shape and dtype of ``x`` and is the compressor's lossy
    reconstruction of it. Implementations raise ``PayloadError`` on any malformed payload.
    """

    name: str

    @abstractmethod
    def compress(self, x: torch.Tensor) -> bytes: ...

    @abstractmethod
    def decompress(self, payload: bytes) -> torch.Tensor: ...


def check_finite(x: torch.Tensor) -> None:
    """Refuse NaN/Inf: they would poison the aggregate silently on the other side."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"cannot compress a tensor with {bad} NaN/Inf entries")
