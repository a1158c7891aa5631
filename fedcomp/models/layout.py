"""Flat float32 view of a model's floating-point state.

What crosses the wire is one vector per model: every floating-point tensor of the state dict
(parameters, and float buffers such as batch-norm statistics) in state-dict order. Integer
buffers (``num_batches_tracked``) stay local. Compressors with layer-wise scope use the same
layout to cut the vector back into tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StateLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: nn.Module | Mapping[str, torch.Tensor]) -> "StateLayout":
        if isinstance(state, nn.Module):
            state = state.state_dict()
        items = [(k, tuple(v.shape)) for k, v in state.items() if v.is_floating_point()]
        return cls(tuple(k for k, _ in items), tuple(s for _, s in items))

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, state: nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(state, nn.Module):
            state = state.state_dict()
        return torch.cat([state[k].detach().reshape(-1).float() for k in self.names])

    def load(self, state: nn.Module | Mapping[str, torch.Tensor], flat: torch.Tensor) -> None:
        """Copy ``flat`` into the floating-point tensors of a model or state dict, in place."""
        if flat.numel() != self.numel:
            raise ValueError(f"vector has {flat.numel()} values, the model needs {self.numel}")
        if isinstance(state, nn.Module):
            state = state.state_dict()
        with torch.no_grad():
            for name, chunk in zip(self.names, torch.split(flat, self.sizes)):
                state[name].copy_(chunk.view_as(state[name]))
