"""Whole-vector passes of a client's round on the CPU (copies, the finiteness check), by numpy.

A client round's glue between training and the wire -- taking the broadcast model, copying it
into the scratch model, checking an update for NaN/Inf -- is a few passes over one model-sized
vector, each after other Python work. torch runs such a pass on its OpenMP team, whose threads
have gone to sleep by then (``GOMP_SPINCOUNT``, ``fedcomp/__init__.py``): waking them cost more
than the pass. On the 2-core machine, for d = 199k float32 after 2 ms of other work, torch's
clone took 68 us and numpy's copy 23 us; torch's ``aminmax`` 76 us and numpy's min and max
23 us. Elsewhere (GPU tensors, dtypes numpy lacks) the same calls run in torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def in_numpy(*xs: torch.Tensor) -> bool:
    """Whether passes over ``xs`` run in numpy: CPU tensors of a float dtype numpy has."""
    return all(x.device.type == "cpu" and x.dtype in _NUMPY_FLOATS for x in xs)


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)``: by numpy for CPU tensors of one shape and float dtype, else by torch
    (casting, broadcasting, across devices)."""
    if in_numpy(dst, src) and dst.dtype == src.dtype and dst.shape == src.shape:
        np.copyto(dst.detach().numpy(), src.detach().numpy())
        return dst
    return dst.copy_(src)


def clone(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` that shares nothing with it."""
    return torch.from_numpy(np.array(x.detach().numpy(), order="C")) if in_numpy(x) else x.clone(memory_format=torch.contiguous_format)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``: its minimum and maximum are finite (NaN propagates through
    both). An order of magnitude faster than ``isfinite(x).all()``, which builds a boolean copy."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if in_numpy(x):
        a = x.detach().numpy()
        return math.isfinite(a.min()) and math.isfinite(a.max())
    low, high = torch.aminmax(x)
    return math.isfinite(low.item()) and math.isfinite(high.item())  # Python floats: no 0-d tensor ops
