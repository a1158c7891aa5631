"""HGC's predictor (Eq. 4) and the XOR residue of quantized symbols.

    u_t = beta u_{t-1} + (1 - beta) g_t,   v_t = beta v_{t-1} + (1 - beta) g_t^2,
    p_t = u_t / (sqrt(v_t) + eps)

g_t is the aggregated compressed gradient every party reconstructs from the same bytes, so the
server's and every client's buffers evolve identically: the update runs in float64 in one
fixed order (this class, used on both sides), and tests compare the buffers bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from fedcomp.hgc.quantizer import quantize_levels


class Predictor:
    def __init__(self, beta: float = 0.9, eps: float = 1e-8) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"predictor beta must be in [0, 1), got {beta}")
        self.beta, self.eps = beta, eps
        self.u = torch.zeros(0, dtype=torch.float64)
        self.v = torch.zeros(0, dtype=torch.float64)

    def reset(self, d: int) -> None:
        """u = v = 0 for a d-dimensional gradient."""
        self.u = torch.zeros(d, dtype=torch.float64)
        self.v = torch.zeros(d, dtype=torch.float64)

    def observe(self, g: torch.Tensor) -> None:
        """Fold in the round's aggregated compressed gradient (dense)."""
        g = g.double().reshape(-1)
        if self.u.numel() != g.numel():
            self.u = torch.zeros_like(g)
            self.v = torch.zeros_like(g)
        self.u = self.beta * self.u + (1 - self.beta) * g
        self.v = self.beta * self.v + (1 - self.beta) * g * g

    def predict(self, mask: torch.Tensor) -> torch.Tensor:
        """p_t at the masked coordinates (zeros before the first observation)."""
        if self.u.numel() == 0:
            return torch.zeros(len(mask), dtype=torch.float64)
        return self.u[mask] / (self.v[mask].sqrt() + self.eps)

    def predicted_symbols(self, mask: torch.Tensor, bits: int) -> np.ndarray:
        """The prediction, sparsified on ``mask`` and quantized like the gradient."""
        return quantize_levels(self.predict(mask), bits)[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "v": self.v}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.u = state.get("u", torch.zeros(0, dtype=torch.float64)).double()
        self.v = state.get("v", torch.zeros(0, dtype=torch.float64)).double()


def xor_residue(symbols: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The residue the client sends; XOR is its own inverse, so the same call restores."""
    return np.bitwise_xor(symbols, predicted)
