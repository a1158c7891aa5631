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

g_t is zero off the round's mask, so the decay is kept as a scale per buffer (u = s_u x stored)
and an update touches only the mask: O(k) per round instead of O(d). When a scale falls below
1e-100 it is folded into its buffer (an O(d) pass every few thousand rounds; every round if
beta = 0). A resynchronised client receives the stored buffers and their scales, so it continues
with exactly the server's representation.

Buffers are never changed in place once handed out (``observe`` works on a copy, O(d)), so
clients in one process can share one version's buffers (``fl/hgc_client.py``). The quantized
prediction for a mask is computed once per state: every entry of a round's relay sits on the
same shared mask.
"""

from __future__ import annotations

import numpy as np
import torch

from fedcomp.hgc.quantizer import quantize_segments

_FOLD_BELOW = 1e-100


class Predictor:
    def __init__(self, beta: float = 0.9, eps: float = 1e-8, beta2: float | None = None) -> None:
        for name, b in (("beta", beta), ("beta2", beta2)):
            if b is not None and not 0 <= b < 1:
                raise ValueError(f"predictor {name} must be in [0, 1), got {b}")
        self.beta, self.eps = beta, eps
        self.beta2 = beta if beta2 is None else beta2
        self._memo: tuple[tuple[torch.Tensor, tuple], np.ndarray] | None = None
        self.reset(0)

    def reset(self, d: int) -> None:
        """u = v = 0 for a d-dimensional gradient."""
        self.u = torch.zeros(d, dtype=torch.float64)
        self.v = torch.zeros(d, dtype=torch.float64)
        self.su = self.sv = 1.0
        self._memo = None

    @staticmethod
    def _decay(buffer: torch.Tensor, scale: float, beta: float) -> float:
        scale *= beta
        if scale < _FOLD_BELOW:
            buffer.mul_(scale)
            scale = 1.0
        return scale

    def observe(self, g: torch.Tensor, support: torch.Tensor | None = None) -> None:
        """Fold in the round's aggregated compressed gradient (dense), which is zero outside
        ``support`` (the round's mask; None: anywhere)."""
        g = g.double().reshape(-1)
        if self.u.numel() != g.numel():
            self.reset(g.numel())
        self.u, self.v, self._memo = self.u.clone(), self.v.clone(), None  # others may hold the old buffers
        self.su = self._decay(self.u, self.su, self.beta)
        self.sv = self._decay(self.v, self.sv, self.beta2)
        values = g if support is None else g[support]
        where = slice(None) if support is None else support
        self.u[where] += (1 - self.beta) / self.su * values
        self.v[where] += (1 - self.beta2) / self.sv * values * values

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t and v_t of Eq. 4 (materialised, O(d))."""
        return self.su * self.u, self.sv * self.v

    def predict(self, mask: torch.Tensor) -> torch.Tensor:
        """p_t at the masked coordinates (zeros before the first observation)."""
        if self.u.numel() == 0:
            return torch.zeros(len(mask), dtype=torch.float64)
        return self.su * self.u[mask] / ((self.sv * self.v[mask]).sqrt() + self.eps)

    def predicted_symbols(self, mask: torch.Tensor, bits: int, cuts: np.ndarray) -> np.ndarray:
        """The prediction, sparsified on ``mask`` and quantized like the gradient (per segment);
        asked again for the same mask tensor, bits and cuts, the same array (read-only)."""
        key = (bits, cuts.tobytes())
        if self._memo is not None and self._memo[0][0] is mask and self._memo[0][1] == key:
            return self._memo[1]
        symbols = quantize_segments(self.predict(mask), cuts, bits)[0]
        symbols.flags.writeable = False
        self._memo = ((mask, key), symbols)  # holding the mask keeps its identity unambiguous
        return symbols

    def state(self) -> dict[str, torch.Tensor]:
        """The stored buffers and their scales, exactly (what a resync carries)."""
        return {"u": self.u, "v": self.v, "scale": torch.tensor([self.su, self.sv], dtype=torch.float64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.u = state.get("u", torch.zeros(0, dtype=torch.float64)).double()
        self.v = state.get("v", torch.zeros(0, dtype=torch.float64)).double()
        scale = state.get("scale")
        self.su, self.sv = (float(scale[0]), float(scale[1])) if scale is not None else (1.0, 1.0)
        self._memo = None


def xor_residue(symbols: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The residue the client sends; XOR is its own inverse, so the same call restores."""
    return np.bitwise_xor(symbols, predicted)
