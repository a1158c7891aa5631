"""The compressor interface every scheme implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fedcomp.vectors import all_finite


class Compressor(ABC):
    """Turns a tensor into self-describing bytes and back.

    ``decompress(compress(x))`` has the shape and dtype of ``x`` and is the compressor's lossy
    reconstruction of it. Implementations raise ``PayloadError`` on any malformed payload; a
    receiver that knows what it expects (the model layout) passes ``shape`` and ``dtype`` and a
    payload describing anything else is refused before decoding allocates anything.

    Stateful compressors (error feedback, AdaComp's residue) expose their state as named
    tensors through ``state()``/``load_state()`` so a Flower client can keep it in its
    ``Context`` between rounds; randomised ones draw from a generator that ``reseed`` resets,
    so a run is reproducible whichever process executes a client.
    """

    name: str

    @abstractmethod
    def compress(self, x: torch.Tensor) -> bytes: ...

    @abstractmethod
    def decompress(self, payload: bytes, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def decompress_sparse(self, payload: bytes, shape: tuple[int, ...] | None = None,
                          dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``decompress`` as (ascending flat indices, the values there), zero elsewhere, or
        (None, the flat dense vector), values in the payload's dtype. Sparse compressors
        override it so that error feedback and aggregation touch k entries, not d."""
        return None, self.decompress(payload, shape, dtype).reshape(-1)

    def compress_donated(self, x: torch.Tensor) -> bytes:
        """``compress(x)`` where the caller hands ``x`` over and never reads it again (as JAX's
        buffer donation): a stateful compressor may overwrite it and keep its storage as state
        (error feedback's residual). By default, ``compress``."""
        return self.compress(x)

    def compress_decoded(self, x: torch.Tensor) -> tuple[bytes, tuple[torch.Tensor | None, torch.Tensor]]:
        """``compress(x)`` and the receiver's ``decompress_sparse`` of it, D(p): what error
        feedback subtracts. Compressors that hold D(p) while encoding return it without
        decoding their own payload."""
        payload = self.compress(x)
        return payload, self.decompress_sparse(payload)

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless, got state {sorted(state)}")

    def reseed(self, seed: int) -> None:
        """Reset the random stream (no-op for deterministic compressors)."""

    def set_round(self, server_round: int) -> None:
        """Tell a scheduled compressor (warm-up) which round it compresses for."""

    def set_ratio(self, ratio: float) -> None:
        """Use this sparsification ratio from now on (ratio controllers)."""
        raise ValueError(f"compressor {self.name!r} has no sparsification ratio to control")

    def take_momentum(self, momentum: float) -> bool:
        """Offered the round's local SGD momentum: a compressor that applies momentum itself
        (DGC's momentum correction) takes it and returns True, and the client then trains
        without optimizer momentum. Others return False."""
        return False


def check_finite(x: torch.Tensor) -> None:
    """Refuse NaN/Inf: they would poison the aggregate silently on the other side."""
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"cannot compress a tensor with {bad} NaN/Inf entries")
