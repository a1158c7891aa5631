"""Engines that run the ServerApp against the ClientApp.

``inline`` (default): ``InlineGrid`` is a Flower ``Grid`` that hands each Message straight to
the ClientApp in this process, one node after another, with a persistent ``Context`` per node
(a ``ResidentContext``: client tensors stay in memory as they are, see ``client_state``).
The apps, the strategy and every Message are the same as under Flower's engines; what goes is
the process/actor hop, which costs more than the local training of a small model.

``pool``: the same Grid contract with the nodes spread over persistent worker processes that
train in parallel (``fedcomp.fl.pool``).

``batched``: the inline Grid with each round's local training done as one vmapped computation
per group of same-shaped clients (``fedcomp.fl.batched``).

``batched_pool``: the pool, each worker training its share of a round's cohort as ``batched``
does.

``ray``: Flower's simulation engine (``flwr.simulation.run_simulation``), one Ray actor per
``simulation.client_cpus``. Use it when clients need isolation or several GPUs.

Users scaling past one machine run the same apps with ``flwr run`` (see README).
"""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig

from fedcomp.fl.client_app import make_client_app
from fedcomp.fl.client_state import ResidentContext, client_state
from fedcomp.fl.server_app import make_server_app, run_server
from fedcomp.fl.state_store import StateStore

SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID
log = logging.getLogger("fedcomp")


def declare_server_task(run_id: int) -> None:
    """Flower's runtimes declare which task a process runs before Messages are built."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SERVER_NODE_ID


def call_client_app(app: ClientApp, msg: Message, context: Context) -> Message:
    """The ClientApp's reply; an exception becomes an error reply, as under Flower's engines
    (the strategy drops that client for the round), its traceback logged."""
    try:
        return app(msg, context)
    except Exception as exc:  # noqa: BLE001 -- any client failure is that client's, not the run's
        log.warning("client on node %d raised %s: %s", msg.metadata.dst_node_id, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


ClientSnapshot = tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]  # tensor groups, numbers


class LocalGrid(Grid):
    """What fedcomp's own Grids share: messages delivered by this process, replies kept until
    pulled, and access to the clients' state for checkpoints."""

    def __init__(self, run_id: int = 1) -> None:
        self._run_id = run_id
        self._replies: dict[str, Message] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    @staticmethod
    def assign_id(msg: Message) -> None:
        """The id a SuperLink would assign (Flower's InMemoryGrid does the same)."""
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def client_snapshots(self) -> dict[int, ClientSnapshot]:
        """Every node's client state (checkpoints)."""
        raise NotImplementedError

    def restore_clients(self, snapshots: dict[int, ClientSnapshot]) -> None:
        """Set every node's client state (nodes missing from ``snapshots`` start empty)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the grid holds (worker processes)."""


class InlineGrid(LocalGrid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(
        self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None, run_id: int = 1,
        resident: bool = True, store: StateStore | None = None,
    ) -> None:
        """``resident=False`` keeps client tensors as ArrayRecords, as Flower's engines must;
        resident ones live in ``store`` (default: unbounded memory)."""
        super().__init__(run_id)
        self._app = client_app
        self.store = store if store is not None else StateStore()
        # Node ids start above the server's id, as Flower's are distinct from it.
        self._contexts = {
            node: resident_context(run_id, node, partition, num_nodes, self.store, run_config) if resident
            else Context(run_id=run_id, node_id=node, node_config={"partition-id": partition, "num-partitions": num_nodes},
                         state=RecordDict(), run_config=dict(run_config or {}))
            for partition, node in enumerate(range(SERVER_NODE_ID + 1, SERVER_NODE_ID + 1 + num_nodes))
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id}")
            self.assign_id(msg)
            self._replies[msg.metadata.message_id] = call_client_app(self._app, msg, self._contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def client_snapshots(self) -> dict[int, ClientSnapshot]:
        return {node: client_state(context).snapshot() for node, context in self._contexts.items()}

    def restore_clients(self, snapshots: dict[int, ClientSnapshot]) -> None:
        for node, context in self._contexts.items():
            client_state(context).restore(*snapshots.get(node, ({}, {})))

    def close(self) -> None:
        self.store.close()


def resident_context(run_id: int, node: int, partition: int, num_nodes: int, store: StateStore,
                     run_config: dict[str, Any] | None = None) -> ResidentContext:
    return ResidentContext(run_id=run_id, node_id=node, node_config={"partition-id": partition, "num-partitions": num_nodes},
                           state=RecordDict(), run_config=dict(run_config or {}), store=store)


def state_store(sim: DictConfig, share: int = 1) -> StateStore:
    """The client-state store of one of ``share`` engine processes (``simulation.state_memory_gb``)."""
    budget = sim.get("state_memory_gb")
    return StateStore(None if budget is None else budget * 2**30 / share, sim.get("spill_dir"))


def client_threads(sim: DictConfig) -> None:
    """``simulation.client_cpus`` as this process's torch threads (unset: torch's default)."""
    if sim.get("client_cpus"):
        torch.set_num_threads(max(1, int(sim.client_cpus)))


def run_inline(cfg: DictConfig, out_dir: str | Path, run_id: int = 1, resume: bool = False) -> dict[str, Any]:
    declare_server_task(run_id)
    client_threads(cfg.simulation)
    grid = InlineGrid(make_client_app(cfg), cfg.simulation.num_clients, run_id=run_id, store=state_store(cfg.simulation))
    try:
        return run_server(grid, cfg, out_dir, resume)
    finally:
        grid.close()


def run_pool(cfg: DictConfig, out_dir: str | Path, run_id: int = 1, resume: bool = False) -> dict[str, Any]:
    from fedcomp.fl.pool import PoolGrid, client_work
    from fedcomp.fl.runtime import get_runtime

    declare_server_task(run_id)
    rt = get_runtime(cfg)
    if cfg.simulation.backend == "batched_pool":
        from fedcomp.fl.batched import check_model

        check_model(rt.model)  # before any worker starts
    grid = PoolGrid(cfg, client_work(cfg, rt.partition.sizes), run_id)
    try:
        return run_server(grid, cfg, out_dir, resume)
    finally:
        grid.close()


def run_ray(cfg: DictConfig, out_dir: str | Path) -> None:
    from flwr.simulation import run_simulation

    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.client_cpus or 1, "num_gpus": cfg.simulation.client_gpus},
        "init_args": {"log_to_driver": bool(cfg.verbose), "logging_level": logging.INFO if cfg.verbose else logging.ERROR},
    }
    if not cfg.verbose:
        # run_simulation's own deprecation notice and the SuperLink's database set-up logs.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(cfg, out_dir),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.simulation.num_clients,
            backend_config=backend_config,
            verbose_logging=bool(cfg.verbose),
        )


def run_experiment(cfg: DictConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run with the configured backend; return the summary written to ``out_dir``.
    ``resume``: continue from ``out_dir``'s checkpoint (fedcomp's own engines)."""
    backend = cfg.simulation.backend
    if backend in ("pool", "batched_pool"):
        return run_pool(cfg, out_dir, resume=resume)
    if backend == "batched":
        from fedcomp.fl.batched import run_batched

        return run_batched(cfg, out_dir, resume=resume)
    if backend == "ray":
        if resume:
            raise ValueError("Flower's Ray engine keeps client state out of reach: resume runs with the inline or pool engine")
        import json

        run_ray(cfg, out_dir)
        summary_path = Path(out_dir) / "summary.json"
        if not summary_path.is_file():
            raise RuntimeError(f"the Ray simulation ended without writing {summary_path}; rerun with verbose=true")
        return json.loads(summary_path.read_text())
    return run_inline(cfg, out_dir, resume=resume)
