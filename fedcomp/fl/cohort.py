"""Where a client's local training runs: in place, or handed to a cohort trainer.

``local_training`` is the one call a client round makes to train. Normally it trains the
process's scratch model in place. The batched engine (``fedcomp.fl.batched``) runs each
client's round in a greenlet of its own, one at a time, with a *parking* function set for the
thread they run on: the round then hands its training request over and waits, and once every
client of the round has done so the engine trains all of them as one computation and resumes
them one by one. Everything before and after training (decoding, state, compression) is the same
ClientApp code on every engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedcomp.fl.local import train_local
from fedcomp.fl.runtime import Runtime


@dataclass
class TrainingRequest:
    """One client's local training: from flat parameters ``w``, on ``indices``, batches drawn
    from ``seed``; ``training`` is ``train_local``'s keyword arguments and ``buffers`` the
    persistent momentum buffers (updated in place) or None."""

    w: torch.Tensor
    indices: torch.Tensor
    seed: int
    training: dict
    buffers: dict[str, torch.Tensor] | None
    update: torch.Tensor | None = None  # flat parameters after training minus w, on the training device
    update_sq_norm: float | None = None  # ||update||^2 where the trainer computed it (the batched engine, while it was in the caches)
    loss: float = 0.0
    compute_s: float = 0.0


_thread = threading.local()


def set_parking(park: Callable[[TrainingRequest], None] | None) -> None:
    """Route this thread's hook-free training requests to ``park`` (None: train in place)."""
    _thread.park = park


def local_training(rt: Runtime, request: TrainingRequest, grad_hook: Callable[[nn.Module], None] | None) -> TrainingRequest:
    """Fill ``request``'s result. Requests with a gradient hook (client algorithms) always train
    in place: the hook works on the scratch model."""
    park = getattr(_thread, "park", None)
    if park is not None and grad_hook is None:
        park(request)
        return request
    return train_in_place(rt, request, grad_hook)


def train_in_place(rt: Runtime, request: TrainingRequest, grad_hook: Callable[[nn.Module], None] | None = None) -> TrainingRequest:
    """Fill ``request``'s result by training the process's scratch model (``train_local``)."""
    rt.layout.load(rt.model, request.w)
    start = time.perf_counter()
    request.loss = train_local(rt.model, rt.train.x, rt.train.y, request.indices, generator=torch.Generator().manual_seed(request.seed),
                               momentum_buffers=request.buffers, grad_hook=grad_hook, **request.training)
    request.compute_s = time.perf_counter() - start
    request.update = rt.model_update(request.w)
    return request
