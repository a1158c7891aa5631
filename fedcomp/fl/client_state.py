"""Where a client keeps its tensors between rounds: error-feedback memory, optimizer momentum,
model replicas, HGC buffers.

Flower gives each node a ``Context`` whose ``state`` survives across rounds. Under Flower's
engines (Ray, ``flwr run``) the Context is serialised between calls, so tensors must be
``ArrayRecord``s (``RecordState``). An engine that keeps a node's Context object in one
process for the whole run (the inline engine) hands the ClientApp a ``ResidentContext``;
its tensors are then kept as they are (``ResidentState``), which spares each client round the
np.save/np.load of every buffer (for HGC on cnn4, about 60 MB per client per round). Both
give the same bytes and the same model (tested).

A resident Context's tensors live in its engine's ``StateStore`` (``fl/state_store.py``), which
keeps them within ``simulation.state_memory_gb`` by spilling to disk. ``simulation.ef_dtype:
bfloat16`` keeps the error-feedback memory in bfloat16 (half the bytes; the residual then
loses the low 16 bits of its mantissa every round, an explicit trade-off of fidelity for
memory), on every engine alike.

Small scalars (versions, reset counters) stay ``ConfigRecord``s in ``Context.state`` either way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedcomp.fl.state_store import StateStore


class ClientState(ABC):
    """One client's named groups of tensors, and small integers (versions, counters) kept as
    ConfigRecords in ``records`` (the Context's state). ``reduced`` maps a group to the dtype
    its float32 tensors are kept in (read back as float32)."""

    def __init__(self, records: RecordDict, reduced: dict[str, torch.dtype] | None = None) -> None:
        self.records = records
        self.reduced = reduced or {}

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        group = self._get(name)
        if group is None or name not in self.reduced:
            return group
        return {k: v.float() if v.dtype == self.reduced[name] else v for k, v in group.items()}

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` under ``name`` (an empty dict removes the group)."""
        if name in self.reduced:
            tensors = {k: v.to(self.reduced[name]) if v.dtype == torch.float32 else v for k, v in tensors.items()}
        self._put(name, tensors)

    def number(self, name: str) -> int | None:
        return int(self.records[name]["value"]) if name in self.records else None

    def set_number(self, name: str, value: int) -> None:
        self.records[name] = ConfigRecord({"value": int(value)})

    @abstractmethod
    def _get(self, name: str) -> dict[str, torch.Tensor] | None: ...

    @abstractmethod
    def _put(self, name: str, tensors: dict[str, torch.Tensor]) -> None: ...

    def tensor(self, name: str, key: str) -> torch.Tensor | None:
        group = self.get(name)
        return None if group is None else group.get(key)

    def drop(self, name: str) -> None:
        self.put(name, {})

    @abstractmethod
    def names(self) -> list[str]:
        """The tensor groups held."""

    def is_empty(self) -> bool:
        """No tensor group and no number held (a client that has not trained, or whose method
        keeps nothing between rounds)."""
        return not self.names() and not any(isinstance(rec, ConfigRecord) and "value" in rec for rec in self.records.values())

    def snapshot(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
        """Every tensor group (as stored) and number (checkpoints)."""
        numbers = {name: int(rec["value"]) for name, rec in self.records.items() if isinstance(rec, ConfigRecord) and "value" in rec}
        return {name: self._get(name) for name in self.names()}, numbers

    def restore(self, groups: dict[str, dict[str, torch.Tensor]], numbers: dict[str, int]) -> None:
        for name in self.names():
            self.drop(name)
        for name, tensors in groups.items():
            self._put(name, tensors)
        for name, value in numbers.items():
            self.set_number(name, value)


_BF16 = "@bf16"


class RecordState(ClientState):
    """Tensors as ArrayRecords in ``Context.state``: portable across processes and machines."""

    def _get(self, name: str) -> dict[str, torch.Tensor] | None:
        if name not in self.records:
            return None
        stored = self.records[name].to_torch_state_dict()
        return {k.removesuffix(_BF16): v.view(torch.bfloat16) if k.endswith(_BF16) else v for k, v in stored.items()}

    def _put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            # Flower's arrays have no bfloat16: such tensors travel as their int16 bit patterns.
            self.records[name] = ArrayRecord({k + _BF16 if v.dtype == torch.bfloat16 else k:
                                              (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).detach().cpu()
                                              for k, v in tensors.items()})
        else:
            self.records.pop(name, None)

    def names(self) -> list[str]:
        return [name for name, rec in self.records.items() if isinstance(rec, ArrayRecord)]


class ResidentState(ClientState):
    """Tensors held as they are, in the engine's ``StateStore``, for a Context that stays in
    this process."""

    def __init__(self, records: RecordDict, store: StateStore, owner: int, reduced: dict[str, torch.dtype] | None = None) -> None:
        super().__init__(records, reduced)
        self.store, self.owner = store, owner

    def _get(self, name: str) -> dict[str, torch.Tensor] | None:
        return self.store.get(self.owner, name)

    def _put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.store.put(self.owner, name, tensors)

    def names(self) -> list[str]:
        return self.store.names(self.owner)


class ResidentContext(Context):
    """A Context its engine keeps in this process for the whole run (see module doc); its
    tensors live in ``store`` (shared by the engine's contexts; by default one of its own)."""

    def __init__(self, *args, store: StateStore | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store = store if store is not None else StateStore()


def client_state(context: Context, reduced: dict[str, torch.dtype] | None = None) -> ClientState:
    if isinstance(context, ResidentContext):
        return ResidentState(context.state, context.store, context.node_id, reduced)
    return RecordState(context.state, reduced)
