"""How HGC cuts the flat model into segments, each sparsified and quantized on its own.

SOFF, the paper's reference code, sparsifies each parameter tensor at the round's ratio, except
the first and last tensors of a ResNet (stem convolution; classifier weight and bias), which
keep every coordinate (ratio 1), and quantizes each tensor with its own levels
(``soff/algorithms/ugc/utils.py``). The paper's text takes one top-k over the model. Both are
segmentations of the flat vector (``fedcomp.models.StateLayout`` order):

  ``scope: model``      the compressed tensors form one segment (one top-k, one level set)
  ``scope: layerwise``  every tensor is a segment
  ``exempt_first`` / ``exempt_last``: that many tensors at each end are dense segments (every
  coordinate in the mask, quantized with their own levels) -- SOFF's (1, 2) for ResNet-18.

A mask is a sorted index vector, so each segment's entries are one contiguous run of it; the
segmentation is known to both ends from the model layout and the strategy's settings, so it
costs no bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedcomp.compression.selectors import budget, magnitudes, top_k_indices

SCOPES = ("model", "layerwise")


@dataclass(frozen=True)
class Segments:
    bounds: tuple[int, ...]  # segment i covers [bounds[i], bounds[i + 1])
    dense: tuple[bool, ...]  # exempt from sparsification

    @classmethod
    def of(cls, sizes: list[int], scope: str = "model", exempt_first: int = 0, exempt_last: int = 0) -> "Segments":
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if exempt_first < 0 or exempt_last < 0 or exempt_first + exempt_last > len(sizes):
            raise ValueError(f"cannot exempt {exempt_first} + {exempt_last} of {len(sizes)} tensors")
        middle = sizes[exempt_first : len(sizes) - exempt_last]
        lengths = list(sizes[:exempt_first])
        dense = [True] * exempt_first
        if middle:
            lengths += middle if scope == "layerwise" else [sum(middle)]
            dense += [False] * (len(middle) if scope == "layerwise" else 1)
        lengths += sizes[len(sizes) - exempt_last :]
        dense += [True] * exempt_last
        return cls(tuple(int(b) for b in np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])), tuple(dense))

    @property
    def count(self) -> int:
        return len(self.dense)

    @property
    def numel(self) -> int:
        return self.bounds[-1]

    def select(self, x: torch.Tensor, ratio: float) -> torch.Tensor:
        """The mask: every coordinate of dense segments, the top-k of |x| (k = ratio x size)
        of the others; sorted int64 indices, on ``x``'s device."""
        parts = []
        for (lo, hi), dense in zip(zip(self.bounds, self.bounds[1:]), self.dense):
            k = hi - lo if dense else budget(hi - lo, ratio, None)
            if k == hi - lo:
                parts.append(torch.arange(lo, hi, device=x.device))
            elif k:
                parts.append(top_k_indices(magnitudes(x[lo:hi]), k) + lo)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=x.device)

    def cuts(self, mask: torch.Tensor) -> np.ndarray:
        """Positions in the (sorted) mask where each segment's entries start, plus the end."""
        return np.searchsorted(np.asarray(mask), np.asarray(self.bounds))
