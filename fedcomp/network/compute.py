"""Training compute of a model, counted once: FLOPs per sample of one SGD step.

The matrix products and convolutions of a forward pass, the loss and the backward pass on a
small batch are counted with the formulas PyTorch's ``FlopCounterMode`` uses
(``torch.utils.flop_counter.flop_registry``); divided by the batch size this is the work a
client does per training sample, so its compute time is FLOPs/sample x samples trained /
device FLOP/s -- a model of the device, not a reading of the host's clock, hence the same on
every engine and under any machine load.
"""

from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_BATCH = 8


class _FlopCount(TorchDispatchMode):
    """Sums ``flop_registry``'s formula over every op that has one. ``FlopCounterMode`` counts
    the same, but its dispatch hook is wrapped to be skipped by torch.compile, and that wrapper
    imports torch._dynamo (seconds) on first use; nothing here is ever compiled."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def training_flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...], num_classes: int) -> float:
    """Forward + backward FLOPs of one training sample (elementwise ops are not counted)."""
    probe = copy.deepcopy(model).cpu().train()
    x = torch.zeros(_BATCH, *input_shape)
    y = torch.zeros(_BATCH, dtype=torch.long) % max(num_classes, 1)
    with _FlopCount() as counter:
        torch.nn.functional.cross_entropy(probe(x), y).backward()
    return counter.flops / _BATCH
