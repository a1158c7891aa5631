"""Adaptive Threshold: AdaComp (Chen et al. 2018), as benchmarked by Dutta et al.

The gradient is cut into bins of ``bin_size`` coordinates. With G = residue + g (the
accumulated, not yet sent gradient) and the look-ahead H = G + g, coordinate j is sent when
|H_j| >= max_{i in bin(j)} |G_i|; a quiet bin therefore sends about one value, a bin whose
new gradient pushes entries past the bin's maximum sends all of them. Sent entries leave the
residue; the rest stay in it. The residue is AdaComp's own (do not wrap it in error feedback);
it is state, kept by the client between rounds. Values travel as fp32 with Rice-coded
indices; AdaComp's own ternary value quantization is not applied.

Dutta et al.'s reference (sands-lab/layer-wise-aaai20) uses the rule without bins or residue:
``bin_size: null`` makes the whole vector one bin and ``residue: false`` keeps G = g, so a
coordinate is sent when |2 g_j| >= max_i |g_i| -- one threshold per compressed segment (per
layer with ``scope: layerwise``, for the entire model otherwise), as in their Algorithm 1
experiments, which have no error feedback.
"""

from __future__ import annotations

import torch

from fedcomp.compression.quantizers import Float32Values
from fedcomp.compression.recipes import Recipe
from fedcomp.compression.registry import register


class _AdaCompSelector:
    def __init__(self, bin_size: int | None, residue: bool) -> None:
        self.bin_size, self.keeps_residue = bin_size, residue
        self.residue = torch.zeros(0)

    def select(self, g: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.residue.numel() != g.numel():
            self.residue = torch.zeros_like(g)
        acc = self.residue.to(g.device) + g  # the residue comes from the client's CPU store
        look_ahead = acc + g
        bin_size = self.bin_size or max(g.numel(), 1)
        pad = (-g.numel()) % bin_size
        bin_max = torch.nn.functional.pad(acc.abs(), (0, pad)).view(-1, bin_size).amax(dim=1)
        threshold = bin_max.repeat_interleave(bin_size)[: g.numel()]
        idx = torch.nonzero((look_ahead.abs() >= threshold) & (acc != 0)).reshape(-1)
        if self.keeps_residue:
            self.residue = acc.clone()
            self.residue[idx] = 0
        return idx, acc[idx]


@register("adaptive_threshold")
class AdaptiveThreshold(Recipe):
    def __init__(self, bin_size: int | None = 500, residue: bool = True) -> None:
        if bin_size is not None and bin_size < 1:
            raise ValueError(f"bin_size must be >= 1 or null, got {bin_size}")
        super().__init__(_AdaCompSelector(bin_size, residue), Float32Values())

    def state(self) -> dict[str, torch.Tensor]:
        return {"residue": self.selector.residue} if self.selector.keeps_residue else {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.selector.residue = state.get("residue", torch.zeros(0))
