"""Training compute of a model, counted once: FLOPs per sample of one SGD step.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products and convolutions of a
forward pass, the loss and the backward pass on a small batch; divided by the batch size this
is the work a client does per training sample, so its compute time is
FLOPs/sample x samples trained / device FLOP/s -- a model of the device, not a reading of the
host's clock, hence the same on every engine and under any machine load.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

_BATCH = 8


def training_flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...], num_classes: int) -> float:
    """Forward + backward FLOPs of one training sample (elementwise ops are not counted)."""
    probe = copy.deepcopy(model).cpu().train()
    x = torch.zeros(_BATCH, *input_shape)
    y = torch.zeros(_BATCH, dtype=torch.long) % max(num_classes, 1)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(probe(x), y).backward()
    return counter.get_total_flops() / _BATCH
