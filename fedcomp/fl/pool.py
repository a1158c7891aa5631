"""The ``pool`` engine: clients trained in parallel on persistent worker processes.

``simulation.workers`` processes (default: one per core at ``simulation.client_cpus`` threads
each) are started once per run. Each builds the same ``Runtime`` (data, partition, model) and
holds the ClientApp and the resident Contexts of the nodes it owns, so a client's state (error
feedback, momentum, replicas, HGC buffers) stays in its worker between rounds and a worker
trains client after client in one model, as pfl-research's workers do. Ownership starts greedy
by client work (samples trained per round, largest first, to the least-loaded worker). A round
samples a cohort, not the population, so each round is then rebalanced: clients that hold no
state (not trained yet, or a method that keeps none: FedAvg) move from the most to the least
loaded worker while that shortens the round. Clients with state stay where it is: moving it
costs more than it saves (HGC's replicas and buffers, shared by a worker's in-sync clients,
are 6.4 MB per client for the mlp; moving a few took 20-200 ms a round).

The server's Messages are Flower Messages, serialised as Flower's engines serialise them
(protobuf) on the way to a worker and back, except that large bytes values (payloads) travel
beside the protobuf, and a value several messages share (the broadcast model, HGC's relay and
resync) once. A round's messages are sent to every worker at once, and each worker's replies
are read as soon as that worker is done (whichever finishes first), then returned in the order
the messages were pushed.
A client's work depends only on its message, its state and its seed, so results are
bit-identical to the inline engine for any number of workers (tested) when both train at the
same thread count. A worker that dies costs its clients their replies (error replies), not
the run.

``simulation.backend=batched_pool``: each worker trains its share of a round's cohort as the
batched engine does (``fedcomp.fl.batched.call_as_cohort``): parallel clients' bookkeeping on
every worker, batched training within each. Results then equal the inline engine's to float
tolerance, as the batched engine's do.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path

import numpy as np
import torch
from flwr.app import Error, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from omegaconf import DictConfig, OmegaConf

from fedcomp.config.plugins import import_plugins
from fedcomp.fl.checkpoint import pack_snapshots, unpack_snapshots
from fedcomp.fl.client_app import make_client_app
from fedcomp.fl.client_state import client_state
from fedcomp.fl.engine import (
    SERVER_NODE_ID,
    ClientSnapshot,
    LocalGrid,
    call_client_app,
    declare_server_task,
    resident_context,
    state_store,
)
from fedcomp.fl.local import samples_trained
from fedcomp.fl.runtime import get_runtime

log = logging.getLogger("fedcomp")
_COUNT = struct.Struct("<I")
_LARGE = 1 << 16  # bytes values from this size on travel beside the protobuf, once per batch
_REF = b"\x00fedcomp-pool-shared\x00"  # a reference to one of them (no message's own value is one)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pool_shape(sim: DictConfig) -> tuple[int, int]:
    """(workers, threads per worker): ``client_cpus`` threads (default 1) and ``workers``
    (default: the cores those threads fill, at least one)."""
    threads = max(1, int(sim.get("client_cpus") or 1))
    workers = sim.get("workers") or max(1, available_cores() // threads)
    return int(workers), threads


def assign(work: list[float], workers: int) -> list[int]:
    """Greedy longest-processing-time assignment: client i (work[i]) -> worker index."""
    heap = [(0.0, w) for w in range(workers)]
    owner = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        load, w = heapq.heappop(heap)
        owner[i] = w
        heapq.heappush(heap, (load + work[i], w))
    return owner


def rebalance(nodes: Iterable[int], owner: dict[int, int], work: dict[int, float], live: Iterable[int],
              movable: Iterable[int]) -> dict[int, int]:
    """The moves (node -> worker) that even out one round's work over the ``live`` workers:
    repeatedly the largest ``movable`` client of the most loaded worker that still narrows its
    gap to the least loaded one moves there. A dead worker's clients stay (and fail)."""
    live, movable = sorted(set(live)), set(movable)
    mine: dict[int, list[int]] = {w: [] for w in live}
    for n in nodes:
        if owner[n] in mine:
            mine[owner[n]].append(n)
    load = {w: sum(work[n] for n in ns) for w, ns in mine.items()}
    moves: dict[int, int] = {}
    while len(live) > 1:
        heavy = max(live, key=lambda w: (load[w], -w))
        light = min(live, key=lambda w: (load[w], w))
        gap = load[heavy] - load[light]
        fits = [n for n in mine[heavy] if n in movable and 0 < work[n] < gap]
        if not fits:
            return moves
        n = max(fits, key=lambda n: (work[n], -n))
        mine[heavy].remove(n)
        mine[light].append(n)
        load[heavy] -= work[n]
        load[light] += work[n]
        moves[n] = light
    return moves


def _send(conn: Connection, kind: str, blobs: Iterable[bytes] = ()) -> None:
    blobs = list(blobs)
    conn.send_bytes(kind.encode() + _COUNT.pack(len(blobs)))
    for b in blobs:
        conn.send_bytes(b)


def _recv(conn: Connection) -> tuple[str, list[bytes]]:
    head = conn.recv_bytes()
    (n,) = _COUNT.unpack(head[-_COUNT.size :])
    return head[: -_COUNT.size].decode(), [conn.recv_bytes() for _ in range(n)]


def _serialise_batch(batch: list[Message]) -> list[bytes]:
    """A batch of messages as blobs: a count, then each large bytes value the messages carry
    (payloads; a value several messages share -- a broadcast, HGC's relay or resync -- once),
    then the messages with those values replaced by references. Protobuf would copy a large
    value into the message and out again on both sides; beside it the value is copied only
    into and out of the socket. What the other side rebuilds is the same Messages."""
    places: dict[int, list[tuple]] = {}
    values: dict[int, bytes] = {}
    for msg in batch:
        for record in msg.content.config_records.values() if msg.has_content() else ():
            for key, value in record.items():
                # a small value that looks like a reference travels by reference too, so that no
                # client's own bytes can be mistaken for one
                if isinstance(value, bytes) and (len(value) >= _LARGE or value.startswith(_REF)):
                    places.setdefault(id(value), []).append((record, key))
                    values[id(value)] = value
    large = list(places)
    for n, i in enumerate(large):
        for record, key in places[i]:
            record[key] = _REF + _COUNT.pack(n)
    try:
        blobs = [message_to_proto(m).SerializeToString() for m in batch]
    finally:
        for i in large:
            for record, key in places[i]:
                record[key] = values[i]
    return [_COUNT.pack(len(large)), *(values[i] for i in large), *blobs]


def _deserialise_batch(blobs: list[bytes]) -> list[Message]:
    """Inverse of :func:`_serialise_batch`."""
    (n,) = _COUNT.unpack(blobs[0])
    shared = blobs[1 : 1 + n]
    out = []
    for blob in blobs[1 + n :]:
        msg = message_from_proto(ProtoMessage.FromString(blob))
        for record in msg.content.config_records.values() if msg.has_content() else ():
            for key, value in list(record.items()):
                if isinstance(value, bytes) and len(value) == len(_REF) + _COUNT.size and value.startswith(_REF):
                    record[key] = shared[_COUNT.unpack_from(value, len(_REF))[0]]
        out.append(msg)
    return out


def _worker(conn: Connection) -> None:
    """A worker's life: build the runtime, then answer the parent's requests until "stop"."""
    _, (setup,) = _recv(conn)
    init = json.loads(setup)
    cfg_yaml, num_nodes, run_id, threads, workers = init["cfg"], init["num_nodes"], init["run_id"], init["threads"], init["workers"]
    partitions = {int(node): pid for node, pid in init["partitions"].items()}
    torch.set_num_threads(threads)
    try:
        cfg = OmegaConf.create(cfg_yaml)
        import_plugins(cfg)
        declare_server_task(run_id)
        rt = get_runtime(cfg)
        batched = cfg.simulation.backend == "batched_pool"
        if batched:
            from fedcomp.fl.batched import call_as_cohort, prepare_process  # torch.func and greenlet: batched workers only

            prepare_process(rt)
        app = make_client_app(cfg)
        store = state_store(cfg.simulation, share=workers)
        contexts = {node: resident_context(run_id, node, pid, num_nodes, store) for node, pid in partitions.items()}
        _send(conn, "ready")
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails the run with it
        _send(conn, "failed", [traceback.format_exc().encode()])
        return
    while True:
        kind, blobs = _recv(conn)
        if kind == "stop":
            store.close()
            return
        if kind == "train":  # the replies, and which of their clients now hold state
            batch = _deserialise_batch(blobs)
            if batched:
                replies = call_as_cohort(rt, app, batch, contexts)
            else:
                replies = [call_client_app(app, msg, contexts[msg.metadata.dst_node_id]) for msg in batch]
            holding = [m.metadata.dst_node_id for m in batch if not client_state(contexts[m.metadata.dst_node_id]).is_empty()]
            _send(conn, "replies", [json.dumps(holding).encode(), *_serialise_batch(replies)])
        elif kind == "release":  # clients moving to another worker (only stateless ones move)
            for n in json.loads(blobs[0]):
                if not client_state(contexts.pop(int(n))).is_empty():
                    raise RuntimeError(f"asked to release node {n}, which holds state")
            _send(conn, "released")
        elif kind == "adopt":
            for node, pid in json.loads(blobs[0]).items():
                contexts[int(node)] = resident_context(run_id, int(node), pid, num_nodes, store)
            _send(conn, "adopted")
        elif kind == "snapshot":
            _send(conn, "states", pack_snapshots({n: client_state(c).snapshot() for n, c in contexts.items()}))
        elif kind == "restore":
            snapshots = unpack_snapshots(blobs)
            for node, context in contexts.items():
                client_state(context).restore(*snapshots.get(node, ({}, {})))
            _send(conn, "restored")


class PoolGrid(LocalGrid):
    """A Grid whose nodes live on worker processes (see module doc)."""

    def __init__(self, cfg: DictConfig, work: list[float], run_id: int = 1) -> None:
        num_nodes = cfg.simulation.num_clients
        workers, threads = pool_shape(cfg.simulation)
        workers = min(workers, num_nodes)
        self._node_ids = [SERVER_NODE_ID + 1 + i for i in range(num_nodes)]
        owner = assign(work, workers)
        self._owner = {node: owner[i] for i, node in enumerate(self._node_ids)}
        self._work = dict(zip(self._node_ids, work))
        self._holding: set[int] = set()  # nodes whose client holds state (as their workers report)
        self._partition = {node: i for i, node in enumerate(self._node_ids)}
        super().__init__(run_id)
        # Fresh interpreters running this module (not multiprocessing's spawn, which re-imports
        # the caller's main script, nor fork, which can hang after OpenMP threads have run),
        # each connecting back over a local socket with a one-time key.
        self._tmp = tempfile.TemporaryDirectory(prefix="fedcomp-pool-")
        key = secrets.token_bytes(32)
        listener = Listener(str(Path(self._tmp.name) / "socket"), family="AF_UNIX", authkey=key)
        env = {**os.environ, "FEDCOMP_POOL_KEY": key.hex(), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self._procs = [subprocess.Popen([sys.executable, "-m", "fedcomp.fl.pool", listener.address], env=env)
                       for _ in range(workers)]
        self._conns: list[Connection] = []
        self._dead: set[int] = set()
        cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        try:
            for w, conn in enumerate(self._accept(listener, workers)):
                partitions = {node: i for i, node in enumerate(self._node_ids) if owner[i] == w}
                _send(conn, "init", [json.dumps({"cfg": cfg_yaml, "partitions": partitions, "num_nodes": num_nodes,
                                                 "run_id": run_id, "threads": threads, "workers": workers}).encode()])
                self._conns.append(conn)
        finally:
            listener.close()
        for w in range(workers):
            kind, blobs = self._receive(w)
            if kind != "ready":
                self.close()
                raise RuntimeError(f"pool worker {w} failed to start:\n" + (blobs[0].decode() if blobs else "(no report)"))
        log.info("pool engine: %d workers x %d threads", workers, threads)

    def _accept(self, listener: Listener, n: int, timeout_s: float = 300.0) -> list[Connection]:
        """The workers' connections; a worker that exits first (its error on stderr) fails the run."""
        conns: list[Connection] = []
        waiter = threading.Thread(target=lambda: conns.extend(listener.accept() for _ in range(n)), daemon=True)
        waiter.start()
        deadline = time.monotonic() + timeout_s
        while waiter.is_alive():
            waiter.join(0.1)
            failed = [p.returncode for p in self._procs if p.poll() is not None]
            if waiter.is_alive() and (failed or time.monotonic() > deadline):
                self.close()
                raise RuntimeError(f"pool workers did not start (exit codes {failed}; their errors are above)")
        return conns

    def _receive(self, w: int) -> tuple[str, list[bytes]]:
        try:
            return _recv(self._conns[w])
        except (EOFError, OSError):
            self._dead.add(w)
            return "dead", []

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.dst_node_id not in self._owner:
                raise ValueError(f"no node {msg.metadata.dst_node_id}")
            self.assign_id(msg)
        live = [w for w in range(len(self._conns)) if w not in self._dead]
        trained = [m.metadata.dst_node_id for m in messages if m.metadata.message_type == MessageType.TRAIN]
        self._move(rebalance(trained, self._owner, self._work, live, movable=set(trained) - self._holding))
        by_worker: dict[int, list[Message]] = {}
        for msg in messages:
            by_worker.setdefault(self._owner[msg.metadata.dst_node_id], []).append(msg)
        for w, batch in by_worker.items():  # every worker starts before any reply is awaited
            if w not in self._dead:
                try:
                    _send(self._conns[w], "train", _serialise_batch(batch))
                except (BrokenPipeError, OSError):
                    self._dead.add(w)
        waiting = {w: list(reversed(batch)) for w, batch in by_worker.items()}
        while any(waiting.values()):
            busy = {self._conns[w]: w for w, left in waiting.items() if left and w not in self._dead}
            for conn in wait(list(busy)) if busy else ():
                w = busy[conn]
                kind, blobs = self._receive(w)
                replies = _deserialise_batch(blobs[1:]) if kind == "replies" else []
                if len(replies) != len(waiting[w]):
                    self._dead.add(w)  # gone, or no longer speaking the protocol
                    continue
                holding = set(json.loads(blobs[0]))
                for reply in replies:
                    msg = waiting[w].pop()
                    node = msg.metadata.dst_node_id
                    (self._holding.add if node in holding else self._holding.discard)(node)
                    self._replies[msg.metadata.message_id] = reply
            for w, left in waiting.items():
                if left and w in self._dead:
                    log.error("pool worker %d is gone; its clients' replies are lost", w)
                    for m in left:
                        self._replies[m.metadata.message_id] = Message(
                            error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"worker {w} died"), reply_to=m)
                    left.clear()
        return [m.metadata.message_id for m in messages]

    def _move(self, moves: dict[int, int]) -> None:
        """Hand ``moves``' nodes (node -> new worker; clients without state) over."""
        for kind, done, worker_of in (("release", "released", self._owner.get), ("adopt", "adopted", moves.get)):
            for w in sorted({worker_of(n) for n in moves}):
                mine = {n: self._partition[n] for n in sorted(moves) if worker_of(n) == w}
                try:
                    _send(self._conns[w], kind, [json.dumps(mine).encode()])
                except (BrokenPipeError, OSError):
                    self._dead.add(w)
                if w not in self._dead and self._receive(w)[0] != done:
                    raise RuntimeError(f"pool worker {w} could not {kind} clients {sorted(mine)}")
        self._owner |= moves  # a client on a worker that died meanwhile fails, as that worker's own do

    def client_snapshots(self) -> dict[int, ClientSnapshot]:
        out = {}
        for w, conn in enumerate(self._conns):
            _send(conn, "snapshot")
            kind, blobs = self._receive(w)
            if kind != "states":
                raise RuntimeError(f"pool worker {w} did not report its clients' state")
            out |= unpack_snapshots(blobs)
        return out

    def restore_clients(self, snapshots: dict[int, ClientSnapshot]) -> None:
        for w, conn in enumerate(self._conns):
            mine = {n: s for n, s in snapshots.items() if self._owner.get(n) == w}
            _send(conn, "restore", pack_snapshots(mine))
            if self._receive(w)[0] != "restored":
                raise RuntimeError(f"pool worker {w} could not restore its clients' state")
        self._holding = {n for n, (groups, numbers) in snapshots.items() if groups or numbers}

    def close(self) -> None:
        for w, conn in enumerate(self._conns):
            if w not in self._dead:
                try:
                    _send(conn, "stop")
                except (BrokenPipeError, OSError):
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._tmp.cleanup()


def client_work(cfg: DictConfig, sizes: np.ndarray) -> list[float]:
    """Samples each client trains per round (the assignment's weights)."""
    t = cfg.train
    return [float(samples_trained(int(n), epochs=t.epochs, steps=t.steps, batch_size=t.batch_size)) for n in sizes]


if __name__ == "__main__":
    _worker(Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(os.environ["FEDCOMP_POOL_KEY"])))
