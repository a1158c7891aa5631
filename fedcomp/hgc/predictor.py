"""HGC's predictor (Eq. 4) and the XOR residue of quantized symbols.

    u_t = beta u_{t-1} + (1 - beta) g_t,   v_t = beta2 v_{t-1} + (1 - beta2) g_t^2,
    p_t = u_t / (sqrt(v_t) + eps)

Eq. 4 uses one running-average coefficient (beta2 = beta). SOFF, the paper's reference code,
predicts with two (Adam's betas, default 0.8 and 0.9): ``beta2`` selects that variant. The
prediction is quantized like the gradient, so a constant scale on p (SOFF's step size) does
not change it.

g_t is the aggregated compressed gradient every party reconstructs from the same bytes, so the
server's and every client's buffers evolve identically: the update runs in float64 in one
fixed order (this class, used on both sides), and tests compare the buffers bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from fedcomp.hgc.quantizer import quantize_segments


class Predictor:
    def __init__(self, beta: float = 0.9, eps: float = 1e-8, beta2: float | None = None) -> None:
        for name, b in (("beta", beta), ("beta2", beta2)):
            if b is not None and not 0 <= b < 1:
                raise ValueError(f"predictor {name} must be in [0, 1), got {b}")
        self.beta, self.eps = beta, eps
        self.beta2 = beta if beta2 is None else beta2
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
        self.v = self.beta2 * self.v + (1 - self.beta2) * g * g

    def predict(self, mask: torch.Tensor) -> torch.Tensor:
        """p_t at the masked coordinates (zeros before the first observation)."""
        if self.u.numel() == 0:
            return torch.zeros(len(mask), dtype=torch.float64)
        return self.u[mask] / (self.v[mask].sqrt() + self.eps)

    def predicted_symbols(self, mask: torch.Tensor, bits: int, cuts: np.ndarray) -> np.ndarray:
        """The prediction, sparsified on ``mask`` and quantized like the gradient (per segment)."""
        return quantize_segments(self.predict(mask), cuts, bits)[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "v": self.v}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.u = state.get("u", torch.zeros(0, dtype=torch.float64)).double()
        self.v = state.get("v", torch.zeros(0, dtype=torch.float64)).double()


def xor_residue(symbols: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The residue the client sends; XOR is its own inverse, so the same call restores."""
    return np.bitwise_xor(symbols, predicted)
