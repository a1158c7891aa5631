"""Where a client keeps its tensors between rounds: error-feedback memory, optimizer momentum,
model replicas, HGC buffers.

Flower gives each node a ``Context`` whose ``state`` survives across rounds. Under Flower's
engines (Ray, ``flwr run``) the Context is serialised between calls, so tensors must be
``ArrayRecord``s (``RecordState``). An engine that keeps a node's Context object in one
process for the whole run (the inline engine) hands the ClientApp a ``ResidentContext``;
its tensors are then kept as they are (``ResidentState``), which spares each client round the
np.save/np.load of every buffer (for HGC on cnn4, about 60 MB per client per round). Both
give the same bytes and the same model (tested).

Small scalars (versions, reset counters) stay ``ConfigRecord``s in ``Context.state`` either way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict


class ClientState(ABC):
    """One client's named groups of tensors, and small integers (versions, counters) kept as
    ConfigRecords in ``records`` (the Context's state)."""

    def __init__(self, records: RecordDict) -> None:
        self.records = records

    def number(self, name: str) -> int | None:
        return int(self.records[name]["value"]) if name in self.records else None

    def set_number(self, name: str, value: int) -> None:
        self.records[name] = ConfigRecord({"value": int(value)})

    @abstractmethod
    def get(self, name: str) -> dict[str, torch.Tensor] | None: ...

    @abstractmethod
    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` under ``name`` (an empty dict removes the group)."""

    def tensor(self, name: str, key: str) -> torch.Tensor | None:
        group = self.get(name)
        return None if group is None else group.get(key)

    def drop(self, name: str) -> None:
        self.put(name, {})

    @abstractmethod
    def names(self) -> list[str]:
        """The tensor groups held."""

    def snapshot(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
        """Every tensor group and number (checkpoints)."""
        numbers = {name: int(rec["value"]) for name, rec in self.records.items() if isinstance(rec, ConfigRecord) and "value" in rec}
        return {name: self.get(name) for name in self.names()}, numbers

    def restore(self, groups: dict[str, dict[str, torch.Tensor]], numbers: dict[str, int]) -> None:
        for name in self.names():
            self.drop(name)
        for name, tensors in groups.items():
            self.put(name, tensors)
        for name, value in numbers.items():
            self.set_number(name, value)


class RecordState(ClientState):
    """Tensors as ArrayRecords in ``Context.state``: portable across processes and machines."""

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        return self.records[name].to_torch_state_dict() if name in self.records else None

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.records[name] = ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})
        else:
            self.records.pop(name, None)

    def names(self) -> list[str]:
        return [name for name, rec in self.records.items() if isinstance(rec, ArrayRecord)]


class ResidentState(ClientState):
    """Tensors held as they are, for a Context that stays in this process."""

    def __init__(self, records: RecordDict, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        super().__init__(records)
        self.groups = groups

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        group = self.groups.get(name)
        return dict(group) if group is not None else None

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.groups[name] = {k: v.detach().cpu() for k, v in tensors.items()}
        else:
            self.groups.pop(name, None)

    def names(self) -> list[str]:
        return list(self.groups)


class ResidentContext(Context):
    """A Context its engine keeps in this process for the whole run (see module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}


def client_state(context: Context) -> ClientState:
    if isinstance(context, ResidentContext):
        return ResidentState(context.state, context.tensors)
    return RecordState(context.state)
