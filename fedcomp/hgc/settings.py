"""HGC's per-run settings, as the server states them in every train message.

Both ends build the same segmentation and predictor from these, so the values need not be
agreed on out of band; they cost a few bytes of config per message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fedcomp.hgc.predictor import Predictor
from fedcomp.hgc.segments import SCOPES, Segments

BROADCASTS = ("relay", "paper")


@dataclass(frozen=True)
class HGCSettings:
    bits: int = 1  # q: 2^q quantization levels (Eq. 3)
    predictive: bool = True  # XOR residues against the Eq. 4 prediction
    deflate: bool = False  # also try deflate on residue streams
    beta: float = 0.9
    beta2: float | None = None  # SOFF's second predictor coefficient (None: Eq. 4's single beta)
    eps: float = 1e-8
    scope: str = "model"
    exempt_first: int = 0
    exempt_last: int = 0
    broadcast: str = "relay"  # relay: the clients' entries (lossless) | paper: fp32 g~ on the mask
    # DGC's momentum factor masking (Lin et al. 2018, Sec. 3.2) on HGC's clients: clear the local
    # optimizer's momentum at the coordinates sent this round. Neither 003_... nor SOFF does it.
    momentum_masking: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {self.broadcast!r}")
        if self.exempt_first < 0 or self.exempt_last < 0:
            raise ValueError("exempt_first and exempt_last must be >= 0")
        Predictor(self.beta, self.eps, self.beta2)  # checks the coefficients

    def record(self) -> dict[str, Any]:
        """As ConfigRecord values (no None: a negative beta2 stands for 'same as beta')."""
        out = asdict(self)
        out["beta2"] = -1.0 if self.beta2 is None else self.beta2
        return out

    @classmethod
    def from_record(cls, rec) -> "HGCSettings":
        values = {name: rec[name] for name in cls.__dataclass_fields__}
        values["beta2"] = None if values["beta2"] < 0 else float(values["beta2"])
        return cls(**values)

    def segments(self, sizes: list[int]) -> Segments:
        return Segments.of(sizes, self.scope, self.exempt_first, self.exempt_last)

    def predictor(self) -> Predictor:
        return Predictor(self.beta, self.eps, self.beta2)
