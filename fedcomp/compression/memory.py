"""Error feedback: the part a compressor dropped is added back before the next compression.

    e_0 = 0;  p_t = C(x_t + e_t);  e_{t+1} = x_t + e_t - D(p_t)

(Seide et al. 2014; Karimireddy et al. 2019). A wrapper around any compressor, usable on the
client (uplink) and on the server (downlink); the residual is its state, kept on the device of
the vector it corrects (the client's store holds a CPU copy between rounds).
"""

from __future__ import annotations

import torch

from fedcomp import vectors
from fedcomp.compression.base import Compressor


class ErrorFeedback(Compressor):
    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.name = inner.name
        self.residual = torch.zeros(0)

    def compress(self, x: torch.Tensor) -> bytes:
        flat = x.detach().reshape(-1).float()
        return self._compress_corrected(x, flat + self._residual_for(flat))

    def compress_donated(self, x: torch.Tensor) -> bytes:
        """``compress`` with x_t + e_t summed in ``x``'s own storage, which then holds e_{t+1}:
        a client's fresh update need not be copied into a new d-sized vector every round."""
        flat = x.detach().reshape(-1).float()
        return self._compress_corrected(x, vectors.add_(flat, self._residual_for(flat)))

    def _residual_for(self, flat: torch.Tensor) -> torch.Tensor | float:
        """e_t on ``flat``'s device; e_0 = 0 as a scalar (added, -0.0 becomes +0.0 as with a zero
        vector), without a d-sized zero vector."""
        return self.residual.to(flat.device) if self.residual.numel() == flat.numel() else 0.0

    def _compress_corrected(self, x: torch.Tensor, corrected: torch.Tensor) -> bytes:
        """C(x_t + e_t) from ``corrected`` (flat x_t + e_t), which is then turned into e_{t+1}
        in place and kept."""
        payload, (idx, values) = self.inner.compress_decoded(corrected.reshape(x.shape).to(x.dtype))
        # In place: a sparse D(p) is zero off its indices, where c - 0 = c exactly, so only its
        # k entries are touched.
        values = values.to(corrected.device, torch.float32)
        if idx is None:
            corrected.sub_(values)
        else:
            idx = idx.to(corrected.device)
            corrected.index_put_((idx,), corrected[idx] - values)
        self.residual = corrected
        return payload

    def decompress(self, payload: bytes, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.inner.decompress(payload, shape, dtype)

    def decompress_sparse(self, payload: bytes, shape: tuple[int, ...] | None = None,
                          dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.inner.decompress_sparse(payload, shape, dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual, **{f"inner.{k}": v for k, v in self.inner.state().items()}}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = state.get("residual", torch.zeros(0))
        self.inner.load_state({k[6:]: v for k, v in state.items() if k.startswith("inner.")})

    def reseed(self, seed: int) -> None:
        self.inner.reseed(seed)

    def set_round(self, server_round: int) -> None:
        self.inner.set_round(server_round)

    def set_ratio(self, ratio: float) -> None:
        self.inner.set_ratio(ratio)

    def take_momentum(self, momentum: float) -> bool:
        return self.inner.take_momentum(momentum)
