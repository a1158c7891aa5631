"""Whole-vector passes of a client's round on the CPU (a copy, the finiteness check), by numpy
for vectors up to a size.

A client round's glue between training and the wire -- copying the broadcast model, checking an
update for NaN/Inf -- is a few passes over one model-sized vector, each after other Python
work. torch runs such a pass on its OpenMP team, whose threads have gone to sleep by then
(``GOMP_SPINCOUNT``, ``fedcomp/__init__.py``): for a small vector waking them costs more than
the pass. numpy runs it on the calling thread. Timed on the 2-core machine on data evicted from
the caches, after 2 ms of other work (median of 40):

| float32 entries | torch aminmax | numpy min, max | torch clone | numpy copy |
|---|---|---|---|---|
| 199k (mlp) | 187 us | 129 us | 200 us | 145 us |
| 400k | 243 us | 212 us | 238 us | 277 us |
| 800k | 307 us | 424 us | 374 us | 476 us |
| 1.66M (cnn4) | 495 us | 905 us | 586 us | 970 us |

Beyond about 300k entries the second thread's share of the memory traffic wins, so larger
vectors (and GPU tensors, and dtypes numpy lacks) stay with torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
NUMPY_MAX_NUMEL = 1 << 18  # 1 MB of float32: about where numpy's one thread stops winning (table above)


def in_numpy(*xs: torch.Tensor) -> bool:
    """Whether passes over ``xs`` run in numpy: CPU tensors of a float dtype numpy has, none
    over ``NUMPY_MAX_NUMEL`` entries."""
    return all(x.device.type == "cpu" and x.dtype in _NUMPY_FLOATS and x.numel() <= NUMPY_MAX_NUMEL for x in xs)


def clone(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` that shares nothing with it."""
    return torch.from_numpy(np.array(x.detach().numpy(), order="C")) if in_numpy(x) else x.clone(memory_format=torch.contiguous_format)


def add_(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``a += b`` in place and ``a`` returned; ``b`` a tensor of ``a``'s shape and dtype, or a
    number. One pass that writes where it reads: a sum into a fresh vector also pays for the
    new pages (the mlp's error feedback in a batched round: 90-120 us a client against 670)."""
    if in_numpy(a) and (not isinstance(b, torch.Tensor) or (in_numpy(b) and b.dtype == a.dtype)):
        out = a.detach().numpy()
        np.add(out, b.detach().numpy() if isinstance(b, torch.Tensor) else b, out=out)
        return a
    return a.add_(b)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: its minimum and maximum are finite (NaN propagates through
    both). An order of magnitude faster than ``isfinite(x).all()``, which builds a boolean copy.
    In numpy, one pass of x . x comes first: a finite sum of squares has only finite terms. Only
    where it is not finite (a NaN or Inf, or finite values whose squares overflow the dtype) do
    the two passes of the minimum and maximum decide. A 0.8 MB float32 vector out of the
    caches: ~50 against ~70 us."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if in_numpy(x):
        a = x.detach().numpy()
        if a.flags.c_contiguous:
            flat = a.reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is an answer here, not a fault
                if math.isfinite(float(np.dot(flat, flat))):
                    return True
        return math.isfinite(a.min()) and math.isfinite(a.max())
    low, high = torch.aminmax(x)
    return math.isfinite(low.item()) and math.isfinite(high.item())  # Python floats: no 0-d tensor ops
