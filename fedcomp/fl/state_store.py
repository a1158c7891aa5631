"""Where a process keeps its resident clients' tensors: in memory up to a budget, on disk beyond.

``simulation.state_memory_gb`` bounds the bytes of client state (error feedback, optimizer
momentum, replicas, HGC buffers) an engine process holds in memory. Past it, the least recently
used tensors are written to files in a spill directory and dropped from memory; a client that
needs them again reads them back (its round then pays a file read, ~1-2 GB/s from the page
cache). A tensor several clients share (HGC's in-sync replicas and predictor buffers, one
storage) is held, counted and spilled once.

Tensors handed to ``put`` are not changed in place afterwards (every client round puts new
state), so a spilled tensor read back stays valid on disk: evicting it again is free until a
client puts a new one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class _Slot:
    """One storage: in memory (``tensor``), on disk (``path``, clean when ``on_disk``), or both."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tensor: torch.Tensor | None
    refs: int = 0
    path: Path | None = None
    on_disk: bool = False


def _identity(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


class StateStore:
    """Named tensor groups per client, within ``budget_bytes`` of memory (None: unbounded)."""

    def __init__(self, budget_bytes: float | None = None, spill_dir: str | Path | None = None) -> None:
        self.budget = budget_bytes
        self._spill_root = spill_dir
        self._dir: Path | None = None
        self._groups: dict[object, dict[str, dict[str, int]]] = {}
        self._slots: dict[int, _Slot] = {}
        self._resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._by_storage: dict[tuple, int] = {}
        self._next = 0
        self.resident_bytes = 0
        self.spilled_bytes = 0  # written to disk so far (a measure of the budget's cost)

    @property
    def state_bytes(self) -> int:
        """Bytes of every client tensor held, in memory or spilled (shared storages once)."""
        return sum(slot.nbytes for slot in self._slots.values())

    @property
    def owners(self) -> int:
        """Clients holding any state."""
        return sum(1 for groups in self._groups.values() if groups)

    # -- groups ---------------------------------------------------------------------------------
    def names(self, owner: object) -> list[str]:
        return list(self._groups.get(owner, {}))

    def get(self, owner: object, name: str) -> dict[str, torch.Tensor] | None:
        group = self._groups.get(owner, {}).get(name)
        if group is None:
            return None
        out = {key: self._load(sid) for key, sid in group.items()}
        self._enforce()
        return out

    def put(self, owner: object, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (CPU) as ``owner``'s group ``name``; an empty dict removes it."""
        groups = self._groups.setdefault(owner, {})
        old = groups.pop(name, None)
        if tensors:
            groups[name] = {key: self._ref(t.detach().cpu()) for key, t in tensors.items()}
        for sid in (old or {}).values():
            self._unref(sid)
        self._enforce()

    # -- storages -------------------------------------------------------------------------------
    def _ref(self, t: torch.Tensor) -> int:
        sid = self._by_storage.get(_identity(t)) if t.numel() else None
        if sid is None:
            sid, self._next = self._next, self._next + 1
            self._slots[sid] = _Slot(tuple(t.shape), t.dtype, t.numel() * t.element_size(), t)
            if t.numel():
                self._by_storage[_identity(t)] = sid
            self._resident[sid] = None
            self.resident_bytes += self._slots[sid].nbytes
        self._slots[sid].refs += 1
        self._resident.move_to_end(sid)
        return sid

    def _unref(self, sid: int) -> None:
        slot = self._slots[sid]
        slot.refs -= 1
        if slot.refs:
            return
        if slot.tensor is not None:
            self._drop_resident(sid)
        if slot.path is not None:
            slot.path.unlink(missing_ok=True)
        del self._slots[sid]

    def _drop_resident(self, sid: int) -> None:
        slot = self._slots[sid]
        if slot.tensor.numel():
            self._by_storage.pop(_identity(slot.tensor), None)
        slot.tensor = None
        self._resident.pop(sid, None)
        self.resident_bytes -= slot.nbytes

    def _load(self, sid: int) -> torch.Tensor:
        slot = self._slots[sid]
        if slot.tensor is None:
            raw = torch.from_file(str(slot.path), shared=False, size=slot.nbytes, dtype=torch.uint8)
            slot.tensor = raw.view(slot.dtype).reshape(slot.shape) if slot.nbytes else torch.empty(slot.shape, dtype=slot.dtype)
            if slot.tensor.numel():
                self._by_storage[_identity(slot.tensor)] = sid
            self._resident[sid] = None
            self.resident_bytes += slot.nbytes
        else:
            self._resident.move_to_end(sid)
        return slot.tensor

    def _enforce(self) -> None:
        if self.budget is None:
            return
        while self.resident_bytes > self.budget and self._resident:
            sid = next(iter(self._resident))
            slot = self._slots[sid]
            if not slot.on_disk:
                slot.path = self._spill_dir() / f"{sid}.bin"
                slot.tensor.contiguous().view(-1).view(torch.uint8).numpy().tofile(slot.path)
                slot.on_disk = True
                self.spilled_bytes += slot.nbytes
            self._drop_resident(sid)

    def _spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fedcomp-state-", dir=self._spill_root))
        return self._dir

    def close(self) -> None:
        """Remove the spill files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
