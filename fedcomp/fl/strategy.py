"""CompressedFedAvg: FedAvg whose traffic in both directions is a compressor's real bytes.

Per round: sample clients (``sample``; ``strategy.round`` decides how many and which replies
count, ``fedcomp.fl.rounds``), send each the global model; each client trains locally and
returns its model update Delta_i = w_i - w (local minus received global) encoded with the
uplink compressor (Q_W); the server decodes and checks the updates and applies

    w <- w + server_lr * sum_i n_i Delta_i / sum_i n_i

(n_i: client i's number of training samples, as the server's partition says). Every byte
counted is a payload's length (plus its HMAC tag with ``simulation.integrity: hmac``); the
rest of each serialised message (config, metrics) is counted apart as overhead.

Downlink (``downlink``):
  ``model``  -- the global model coded by the downlink compressor, to every sampled client.
               Clients hold no model between rounds. Right for dense casts (fp32/fp16/bf16).
  ``update`` -- bidirectional compression (Dutta et al. Algorithm 1): the server codes its step
               with the downlink compressor Q_M (with its own error feedback if configured)
               and applies the *decoded* step to w, so w is exactly what in-sync clients hold.
               Clients keep a replica of w; a sampled client whose replica is not confirmed at
               the previous version first receives w in fp32, and those bytes are counted too.

Untrusted replies. A client that raises, does not reply, replies with a payload that does not
decode to a finite update of the model's shape, or reports another partition or sample count
than the server's is dropped from the round with its reason (``RoundStats.failures``, one per
client in metrics.jsonl) and never aggregated; the run goes on. A round with fewer than
``min_replies`` usable updates, or with more than ``max_failure_fraction`` of its sampled
clients failed, is skipped: the model does not move. Protocol state -- which model version a
client holds -- changes only on a confirmed reply, so a client whose message was lost is
resynchronised (counted) the next time it is sampled.

Time. The server keeps a simulated clock; each round's length comes from the system model
(``fedcomp.network.system``): profiles, FLOPs, codec times, never the host's clock unless
``network.compute`` / ``network.codec`` say ``measured``.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcomp.allocation.controllers import History, RatioController
from fedcomp.compression import Compressor, build
from fedcomp.config.checks import check_signature
from fedcomp.config.schema import ConfigError
from fedcomp.fl import messages as M
from fedcomp.fl.algorithms import ClientAlgorithm
from fedcomp.fl.rounds import RoundPolicy
from fedcomp.fl.schedule import TrainSchedule
from fedcomp.metrics import ClientRound, RoundStats
from fedcomp.metrics.records import Failure
from fedcomp.models import StateLayout
from fedcomp.network.system import ClientWork, SystemModel, Timeline
from fedcomp.vectors import all_finite
from fedcomp.wire import PayloadError, Seal, frame_codec

DOWNLINK_MODES = ("model", "update")
log = logging.getLogger("fedcomp")


class ClientFault(Exception):
    """A reply the server cannot use; the message says why."""


@dataclass
class Sent:
    """What the server sent a node this round."""

    bytes: int
    codec: str
    version: int
    overhead: int
    mask_bytes: int = 0  # HGC: the relayed mask, part of ``bytes``
    coded: int = 0  # the payload's own bytes (its codec's work) and the mask, without a client algorithm's extras


@dataclass
class Arrival:
    """A usable reply: the client's record, what it did, and its decoded update."""

    node: int
    client: ClientRound
    work: ClientWork
    update: object  # the strategy's decoded update, or the payload to decode it from (``held_update``)
    timeline: Timeline | None = None
    base_version: int = 0
    extras: dict = field(default_factory=dict)  # the client algorithm's tensors (SCAFFOLD's dc_i)


class CompressedFedAvg(Strategy):
    def __init__(
        self, *, up: Compressor, down: Compressor, system: SystemModel, fraction: float = 1.0, seed: int = 0,
        server_lr: float = 1.0, downlink: str = "model", schedule: TrainSchedule | None = None,
        controller: RatioController | None = None, sizes: np.ndarray | None = None, round: str = "sync",
        deadline_s: float | None = None, overcommit: float = 1.3, buffer_size: int = 10, max_staleness: int = 5,
        concurrency: int | None = None, min_replies: int = 1, max_failure_fraction: float = 1.0, seal: Seal | None = None,
        algorithm: ClientAlgorithm | None = None,
    ) -> None:
        if downlink not in DOWNLINK_MODES:
            raise ValueError(f"downlink must be 'model' or 'update', got {downlink!r}")
        if min_replies < 1 or not 0 <= max_failure_fraction <= 1:
            raise ValueError("min_replies must be >= 1 and max_failure_fraction in [0, 1]")
        self.up, self.down, self.downlink, self.system = up, down, downlink, system
        self.fraction, self.seed, self.server_lr = fraction, seed, server_lr
        self.schedule = schedule or TrainSchedule(base=float("nan"))
        self.controller = controller
        self.sizes = np.asarray(sizes if sizes is not None else [], dtype=np.int64)
        self.history = History(weights=self.sizes / self.sizes.sum() if self.sizes.size else np.zeros(0))
        self.policy = RoundPolicy(round, deadline_s, overcommit, buffer_size, max_staleness, concurrency)
        self.min_replies, self.max_failure_fraction, self.seal = min_replies, max_failure_fraction, seal
        self.algorithm = algorithm or ClientAlgorithm()
        self.rounds: dict[int, RoundStats] = {}
        self.clock = 0.0  # simulated seconds since the run started
        self._partition_of: dict[int, int] = {}  # node -> partition id
        self._ratios: dict[int, float] = {}  # node -> this round's ratio
        self._layout: StateLayout | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._global = torch.empty(0)
        self._full = build("identity")
        self._version = 0  # number of global updates applied
        self._pending: bytes | None = None  # coded step from version - 1 to version (downlink: update)
        self._synced: dict[int, int] = {}  # node -> model version it has confirmed holding
        self._sent: dict[int, Sent] = {}  # node -> this round's downlink
        self._dropped: set[int] = set()  # nodes that dropped out this round
        self._round_failures: list[Failure] = []  # failures found before aggregation (dropouts, lost owners)
        self._setup_overhead = [0, 0]  # control traffic before round 1 (up, down)
        self._round_start = 0.0
        self.stop_reason: str | None = None  # set when training diverges
        self._in_flight: list = []  # async: (arrival time, seq, Arrival)
        self._seq = 0

    @classmethod
    def check_params(cls, params: dict, cfg, sizes: list[int]) -> None:
        """Refuse bad ``strategy.*`` values before any data is loaded (``ConfigError`` naming the key)."""
        check_signature(cls, params)
        if params.get("server_lr", 1.0) <= 0:
            raise ConfigError(f"strategy.server_lr: must be > 0 (got {params['server_lr']})")
        if params.get("min_replies", 1) > cfg.simulation.num_clients:
            raise ConfigError(f"strategy.min_replies: exceeds simulation.num_clients={cfg.simulation.num_clients}")
        if not 0 <= params.get("max_failure_fraction", 1.0) <= 1:
            raise ConfigError(f"strategy.max_failure_fraction: must be in [0, 1] (got {params['max_failure_fraction']})")
        policy = {k: params[k] for k in ("deadline_s", "overcommit", "buffer_size", "max_staleness", "concurrency") if k in params}
        try:
            RoundPolicy(params.get("round", "sync"), **policy)
        except ValueError as exc:
            raise ConfigError(f"strategy.round: {exc}") from None

    # -- set-up and the loop ------------------------------------------------------------------

    def summary(self) -> None:
        pass  # fedcomp reports through its own metrics files

    @property
    def d(self) -> int:
        return self._global.numel()

    def setup(self, grid: Grid, initial_arrays: ArrayRecord) -> None:
        """Take the initial model, and ask every node which partition it trains on (a counted
        control exchange: profiles, sizes and controllers are per partition, Flower is per node)."""
        self._state = initial_arrays.to_torch_state_dict()
        self._layout = StateLayout.of(self._state)
        self._global = self._layout.flatten(self._state)
        nodes = sorted(grid.get_node_ids())
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        self._setup_overhead[1] += sum(M.overhead_bytes(q.content) for q in queries)
        for reply in grid.send_and_receive(queries):
            if reply.has_error() or M.METRICS not in reply.content:
                continue
            self._setup_overhead[0] += M.overhead_bytes(reply.content)
            pid = reply.content[M.METRICS].get("partition-id")
            if isinstance(pid, int) and 0 <= pid < max(len(self.sizes), 1):
                self._partition_of[reply.metadata.src_node_id] = pid
        self.on_setup()

    def on_setup(self) -> None:
        """Subclass hook, called once the model layout is known."""

    def run(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, on_round: Callable[[int], None] | None = None,
            timeout: float = 3600.0, first_round: int = 1, restore: Callable[[], None] | None = None,
            stop_after: int | None = None) -> None:
        """fedcomp's round loop: rounds may be skipped or asynchronous and the model is not
        re-serialised every round. ``on_round(r)`` after each round (evaluation, metrics).
        Resuming: ``restore()`` loads a checkpoint after set-up and the loop starts at
        ``first_round``; ``stop_after`` ends the loop early (the run is then resumable)."""
        self.timeout = timeout
        self.setup(grid, initial_arrays)
        if restore is not None:
            restore()
        last = min(num_rounds, stop_after or num_rounds)
        for r in range(first_round, last + 1):
            if self.policy.kind == "async":
                self.async_round(r, grid)
            else:
                replies = grid.send_and_receive(self.configure_train(r, initial_arrays, ConfigRecord(), grid), timeout=timeout)
                self.aggregate_train(r, replies)
            self.stop_reason = self.stop_reason or self.divergence(self.rounds[r])
            if r == last or self.stop_reason:
                self._count_in_flight(r)
            if on_round is not None:
                on_round(r)
            if self.stop_reason:
                log.warning("round %d: stopping: %s", r, self.stop_reason)
                break

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The server's state between rounds: tensors, and JSON metadata (checkpoints)."""
        tensors = {"global": self._global, "update_norms": torch.tensor(self.history.update_norms, dtype=torch.float64),
                   "grad_sq_norms": torch.tensor(self.history.grad_sq_norms, dtype=torch.float64)}
        if self._pending is not None:
            tensors["pending"] = torch.frombuffer(bytearray(self._pending), dtype=torch.uint8)
        tensors |= {f"down.{k}": v for k, v in self.down.state().items()}
        tensors |= {f"algorithm.{k}": v for k, v in self.algorithm.state().items()}
        meta = {"version": self._version, "clock": self.clock, "synced": {str(n): v for n, v in self._synced.items()},
                "controller": self.controller.state() if self.controller is not None else {}}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if self.policy.kind == "async":
            raise ValueError("asynchronous runs cannot be resumed (clients in flight are not checkpointed)")
        self._global = tensors["global"].clone()
        self.history.update_norms = tensors["update_norms"].tolist()
        self.history.grad_sq_norms = tensors["grad_sq_norms"].tolist()
        self._pending = bytes(tensors["pending"].numpy()) if "pending" in tensors else None
        self.down.load_state({k[5:]: v for k, v in tensors.items() if k.startswith("down.")})
        self.algorithm.load_state({k[10:]: v for k, v in tensors.items() if k.startswith("algorithm.")})
        self._version, self.clock = meta["version"], meta["clock"]
        self._synced = {int(n): v for n, v in meta["synced"].items()}
        if self.controller is not None:
            self.controller.load_state(meta["controller"])

    def divergence(self, stats: RoundStats) -> str | None:
        """Why training has diverged, if it has: the model is no longer finite, or every client
        of a round sent non-finite numbers. A diverged run stops; its metrics are kept."""
        if not all_finite(self._global):
            return "the global model has NaN/Inf entries"
        non_finite = ("NaN", "non-finite")
        if stats.skipped and stats.failures and all(any(w in f.reason for w in non_finite) for f in stats.failures):
            return f"every client of round {stats.round} sent non-finite numbers"
        return None

    def _count_in_flight(self, last_round: int) -> None:
        """Async runs end with clients still training: their traffic happened, so it is
        counted in the last round (as failures: nothing of theirs was aggregated)."""
        stats = self.rounds.get(last_round)
        for *_, a in self._in_flight:
            stats.failures.append(Failure(a.client.partition_id, "still in flight when the run ended", a.client.bytes_down, a.client.bytes_up))
        self._in_flight = []

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None, evaluate_fn=None):
        """Flower's entry point, on fedcomp's loop (``run``)."""
        self.run(grid, initial_arrays, num_rounds, (lambda r: evaluate_fn(r, self.arrays())) if evaluate_fn else None, timeout)

    def arrays(self) -> ArrayRecord:
        """The global model as a Flower ArrayRecord."""
        self._layout.load(self._state, self._global)
        return ArrayRecord(self._state)

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict (shared tensors; copy before changing them)."""
        self._layout.load(self._state, self._global)
        return self._state

    # -- what the server sends ------------------------------------------------------------------

    def partition(self, node: int) -> int:
        return self._partition_of.get(node, -1)

    def sample(self, node_ids: list[int], server_round: int, count: int) -> list[int]:
        """Draw ``count`` of the available nodes without replacement, reproducibly per (seed, round)."""
        node_ids = sorted(node_ids)
        picked = np.random.default_rng([self.seed, server_round]).choice(len(node_ids), size=count, replace=False)
        # Index, not choose from, the ids: Flower's are 64-bit and must stay Python ints.
        return [node_ids[i] for i in sorted(picked)]

    def cohort(self, grid: Grid, server_round: int, exclude: Iterable[int] = ()) -> tuple[list[int], int]:
        """This round's sampled nodes among those online now, and K, the number it needs."""
        everyone = [n for n in sorted(grid.get_node_ids()) if n in self._partition_of]
        skip = set(exclude)
        k = max(1, round(self.fraction * len(everyone)))
        online = [n for n in everyone if n not in skip and self.system.availability.online(self.partition(n), self.clock)]
        if not online and not skip:  # nobody is online: the clock moves to when someone is
            self.clock = self._round_start = self.system.availability.next_online(self.clock)
            online = [n for n in everyone if self.system.availability.online(self.partition(n), self.clock)]
        if not online:
            return [], k
        return self.sample(online, server_round, self.policy.cohort(k, len(online))), min(k, len(online))

    def apply_update(self, update: torch.Tensor) -> torch.Tensor:
        """The step added to the global model, given the data-weighted mean update.
        Override for server optimisers (momentum, Adam, ...)."""
        return self.server_lr * update

    def client_ratios(self, nodes: list[int], server_round: int) -> dict[int, float]:
        """This round's controller ratios by node ({} without a controller)."""
        if self.controller is None:
            return {}
        by_partition = self.controller.ratios(server_round, [self.partition(n) for n in nodes], self.history)
        self._ratios = {n: float(by_partition[self.partition(n)]) for n in nodes}
        return self._ratios

    def local_momentum(self, server_round: int) -> float:
        """The clients' local SGD momentum this round (the training schedule's)."""
        return self.schedule.momentum_at(server_round)

    def resets_before(self, server_round: int) -> int:
        """How many client-state resets (error feedback and momentum cleared) have been
        ordered up to this round; none for FedAvg (HGC orders them, Sec. 3.2)."""
        return 0

    def round_config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        """What every client is told this round: the round, its learning rate and momentum,
        and the resets ordered so far (when any)."""
        out = {**config, M.ROUND: server_round, M.LR: self.schedule.lr(server_round), M.MOMENTUM: self.local_momentum(server_round)}
        if resets := self.resets_before(server_round):
            out[M.RESETS] = resets
        return ConfigRecord(out)

    def payload_fields(self, payload: bytes) -> dict[str, bytes]:
        """A payload and, with integrity on, its HMAC tag."""
        return {M.PAYLOAD: payload, M.TAG: self.seal.tag(payload)} if self.seal else {M.PAYLOAD: payload}

    def _in_sync(self, node_id: int) -> bool:
        """Whether the node has confirmed the previous version, so the pending step brings it level."""
        return self._pending is not None and self._synced.get(node_id) == self._version - 1

    def _downlink_records(self, nodes: list[int]) -> list[ConfigRecord]:
        if self.downlink == "model":
            record = ConfigRecord({**self.payload_fields(self.down.compress(self._global)), M.KIND: M.MODEL, M.VERSION: self._version})
            return [record] * len(nodes)
        full = None
        records = []
        for node_id in nodes:
            if self._in_sync(node_id):
                payload, kind = self._pending, M.DELTA
            else:
                full = full or self._full.compress(self._global)
                payload, kind = full, M.FULL
            records.append(ConfigRecord({**self.payload_fields(payload), M.KIND: kind, M.VERSION: self._version}))
        return records

    def dispatch(self, node: int, records: dict[str, ConfigRecord], server_round: int, payload_key: str, mask_bytes: int = 0) -> Message | None:
        """Note what goes to ``node`` and build its train message; None when the client drops
        out mid-round (its download happened and is counted, nothing comes back)."""
        if extras := self.algorithm.server_extras(self.d):
            records = {**records, M.EXTRA: ConfigRecord(self.algorithm.encode(extras))}
        content = RecordDict(records)
        rec = records[payload_key]
        payload = rec[M.PAYLOAD]
        extra_bytes = sum(len(v) for v in records[M.EXTRA].values()) if M.EXTRA in records else 0
        sent_bytes = len(payload) + len(rec.get(M.TAG, b"")) + mask_bytes + extra_bytes
        self._sent[node] = Sent(sent_bytes, frame_codec(payload), self._version, M.overhead_bytes(content), mask_bytes,
                                len(payload) + mask_bytes)
        if self.system.availability.drops(self.partition(node), server_round):
            self._dropped.add(node)
            self._fail(node, "dropped out mid-round")
            return None
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)

    def begin_round(self) -> None:
        self._round_start = self.clock
        self._sent, self._dropped, self._round_failures = {}, set(), []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.begin_round()
        nodes, self._k = self.cohort(grid, server_round)
        ratios = self.client_ratios(nodes, server_round)
        config = self.round_config(config, server_round)
        messages = []
        for node, down in zip(nodes, self._downlink_records(nodes)):
            node_config = ConfigRecord({**config, M.RATIO: ratios[node]}) if node in ratios else config
            msg = self.dispatch(node, {M.DOWN: down, M.CONFIG: node_config}, server_round, M.DOWN)
            if msg is not None:
                messages.append(msg)
        return messages

    # -- what comes back ------------------------------------------------------------------------

    def open_payload(self, record) -> bytes:
        """The reply's payload, its tag checked when integrity is on."""
        payload = record.get(M.PAYLOAD)
        if not isinstance(payload, bytes):
            raise ClientFault("reply carries no payload")
        if self.seal is not None:
            try:
                self.seal.check(payload, record.get(M.TAG))
            except PayloadError as exc:
                raise ClientFault(str(exc)) from None
        return payload

    def decode_update(self, payload: bytes) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The client's update as (indices, values) or (None, dense values) -- the compressor's
        ``decompress_sparse`` -- of the model's length, finite; else ``ClientFault``."""
        try:
            idx, values = self.up.decompress_sparse(payload, (self.d,), torch.float32)
        except (PayloadError, ValueError) as exc:
            raise ClientFault(f"undecodable update: {exc}") from None
        if not all_finite(values):
            raise ClientFault("update has NaN/Inf entries")
        return idx, values

    def held_update(self, payload: bytes, update: tuple[torch.Tensor | None, torch.Tensor]) -> bytes | tuple:
        """What an arrival keeps until aggregation: a sparse update as decoded (k entries); a
        dense one as its (checked) payload when that is under half its size -- a round's
        arrivals then cost their payloads, not n x d floats -- decoded again when aggregated."""
        idx, values = update
        dense_small = idx is None and len(payload) < values.numel() * values.element_size() // 2
        return payload if dense_small else update

    def client_metrics(self, node: int, metrics) -> dict:
        """The reply's metrics, checked against what the server knows of this client."""
        try:
            m = {k: metrics[k] for k in ("partition-id", "num-examples", "train-loss", "compute-s", "grad-sq-norm", "samples")}
        except KeyError as exc:
            raise ClientFault(f"metrics lack {exc}") from None
        pid = self.partition(node)
        if m["partition-id"] != pid:
            raise ClientFault(f"reports partition {m['partition-id']}, the node trains partition {pid}")
        if self.sizes.size and m["num-examples"] != self.sizes[pid]:
            raise ClientFault(f"reports {m['num-examples']} samples, its partition has {self.sizes[pid]}")
        if not all(np.isfinite(float(m[k])) for k in ("train-loss", "compute-s", "samples")) or m["samples"] < 0:
            raise ClientFault("non-finite training metrics (diverged?)")
        m["encode-s"], m["decode-s"] = float(metrics.get("encode-s", 0.0)), float(metrics.get("decode-s", 0.0))
        return m

    def receive(self, replies: Iterable[Message], expected: Iterable[int] | None = None) -> list[Arrival]:
        """Check every reply; usable ones become Arrivals (their nodes confirmed at the version
        sent), the rest failures. ``expected`` nodes (default: all sent to this round) that
        never replied fail too."""
        arrivals, replied = [], set()
        # Engines deliver replies in completion order; checking them by partition keeps the
        # failure log (and its warnings) the same on every engine.
        for reply in sorted(replies, key=lambda r: self.partition(r.metadata.src_node_id)):
            node = reply.metadata.src_node_id
            if node not in self._sent or node in replied or node in self._dropped:
                continue  # not sampled this round, a duplicate, or a client that dropped out
            if not reply.has_error() and M.LOST in reply.content:
                continue  # an injected lost message: as if nothing had arrived
            replied.add(node)
            sent, pid = self._sent[node], self.partition(node)
            if reply.has_error():  # the last line of an engine's report (Ray's carry whole tracebacks)
                lines = [line.strip() for line in str(reply.error.reason).splitlines() if line.strip()]
                self._fail(node, f"client error: {(lines or ['unknown'])[-1][:200]}")
                continue
            up_bytes = 0
            try:
                record = reply.content[M.UP] if M.UP in reply.content else None
                if record is None or M.METRICS not in reply.content:
                    raise ClientFault("reply lacks its payload or metrics")
                payload = self.open_payload(record)
                up_bytes = len(payload) + len(record.get(M.TAG, b""))
                metrics = self.client_metrics(node, reply.content[M.METRICS])
                update = self.held_update(payload, self.decode_update(payload))
                try:
                    extras = self.algorithm.decode(reply.content.get(M.EXTRA), self.d)
                except PayloadError as exc:
                    raise ClientFault(f"bad client-algorithm extra: {exc}") from None
                up_bytes += sum(len(v) for v in reply.content[M.EXTRA].values()) if M.EXTRA in reply.content else 0
            except ClientFault as exc:
                self._fail(node, str(exc), up_bytes)
                continue
            self._synced[node] = sent.version
            work = ClientWork(pid, sent.bytes, sent.codec, up_bytes, frame_codec(payload), int(metrics["samples"]),
                              float(metrics["compute-s"]), metrics["encode-s"], metrics["decode-s"], sent.coded, len(payload))
            client = ClientRound(pid, up_bytes, sent.bytes, int(self.sizes[pid]) if self.sizes.size else int(metrics["num-examples"]),
                                 float(metrics["train-loss"]), 0.0, self._ratios.get(node), float(metrics["grad-sq-norm"]),
                                 M.overhead_bytes(reply.content), sent.overhead)
            arrivals.append(Arrival(node, client, work, update, base_version=sent.version, extras=extras))
        for node in self._sent if expected is None else expected:
            if node not in replied and node not in self._dropped:
                self._fail(node, "no reply (lost or timed out)")
        return arrivals

    def _fail(self, node: int, reason: str, bytes_up: int = 0) -> None:
        """Drop ``node`` from this round; it must resynchronise before its next delta."""
        self._synced.pop(node, None)
        self._round_failures.append(Failure(self.partition(node), reason, self._sent[node].bytes if node in self._sent else 0, bytes_up))
        log.warning("round: partition %d dropped: %s", self.partition(node), reason)

    # -- timing and aggregation --------------------------------------------------------------------

    def timelines(self, arrivals: list[Arrival]) -> None:
        """Each arrival's simulated timeline from the round's start (after the server has
        encoded the round's downlink)."""
        sent = self._round_start + self._downlink_encode_s()
        for a in arrivals:
            a.timeline = self.system.timeline(a.work, sent)

    def finish(self, stats: RoundStats, accepted: list[Arrival], ends_by: float | None = None) -> None:
        """Record the accepted clients with their simulated times and advance the clock: the
        server decodes uploads one at a time as they arrive; under a deadline a round missing
        anyone lasts until the deadline."""
        t0 = self._round_start
        for a in accepted:
            stats.clients.append(replace(a.client, compute_s=a.timeline.trained - a.timeline.downloaded, finish_s=a.timeline.uploaded - t0))
        end = self.system.server_done([(a.timeline.uploaded, a.work.up_codec, a.work.up_coded) for a in accepted], t0)
        if ends_by is not None or (self.policy.kind == "deadline" and stats.failures):
            end = max(end, t0 + self.policy.deadline_s)
        stats.sim_time_s = end - t0
        self.clock = end

    def _downlink_encode_s(self) -> float:
        """The server's time to encode this round's downlink (once per distinct payload kind)."""
        kinds = {(s.codec, s.coded - s.mask_bytes) for s in self._sent.values()}
        return sum(self.system.server_s(codec, "encode", n) for codec, n in kinds)

    def usable(self, stats: RoundStats, accepted: int) -> bool:
        """Enough replies to move the model (``min_replies``, ``max_failure_fraction``)?"""
        sampled = accepted + len(stats.failures)
        return accepted >= self.min_replies and (not sampled or len(stats.failures) / sampled <= self.max_failure_fraction)

    def select(self, stats: RoundStats, arrivals: list[Arrival]) -> tuple[list[Arrival], float | None]:
        """The round policy's choice; the dropped become failures (bytes counted)."""
        chosen = self.policy.select([(a.timeline.uploaded, a) for a in arrivals], self._k, self._round_start)
        for t, a in chosen.late:
            stats.failures.append(Failure(a.client.partition_id, f"late: upload arrived {t - self._round_start:.3f} s into the round",
                                          a.client.bytes_down, a.client.bytes_up))
        return [a for _, a in chosen.accepted], chosen.ends_by

    def round_arrivals(self, replies: Iterable[Message]) -> list[Arrival]:
        """The round's usable replies (HGC adds its mask owner's, received in phase 1)."""
        return self.receive(replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self._new_stats(server_round)
        arrivals = self.round_arrivals(replies)
        stats.failures += self._round_failures
        self.timelines(arrivals)
        accepted, ends_by = self.select(stats, arrivals)
        if self.usable(stats, len(accepted)):
            self.aggregate(stats, accepted)
            self.algorithm.server_update([a.extras for a in accepted], len(self._partition_of))
        else:
            stats.skipped = True
            log.warning("round %d skipped: %d usable of %d sampled", server_round, len(accepted), len(accepted) + len(stats.failures))
        self.finish(stats, accepted, ends_by)
        self.rounds[server_round] = stats
        return None, MetricRecord({"num-clients": len(stats.clients), "failures": len(stats.failures)})

    def aggregate(self, stats: RoundStats, accepted: list[Arrival], weight: Callable[[Arrival], float] = lambda a: 1.0) -> None:
        """The data-weighted mean of the accepted updates (each also scaled by ``weight``:
        FedBuff's staleness discount), through ``apply_update`` onto the model."""
        n = sum(a.client.num_examples for a in accepted)
        total = torch.zeros_like(self._global)
        for a in accepted:
            idx, values = self.decode_update(a.update) if isinstance(a.update, bytes) else a.update
            scaled = a.client.num_examples * weight(a) * values
            if idx is None:
                total += scaled
            else:  # the same sums as adding the dense update: its other entries add +0.0
                total.index_add_(0, idx, scaled)
        self.apply_step(self.apply_update(total / n), stats, accepted)

    def apply_step(self, step: torch.Tensor, stats: RoundStats, accepted: list[Arrival]) -> None:
        """Move the global model (through the downlink coder under ``downlink: update``)."""
        self.record_history(step, accepted)
        if self.downlink == "model":
            self._global += step
        else:
            self.down.set_round(stats.round)
            self._pending = self.down.compress(step)
            self._global += self.down.decompress(self._pending, (self.d,), torch.float32)
        self._version += 1

    def record_history(self, step: torch.Tensor, accepted: list[Arrival]) -> None:
        """What ratio controllers may look at: the step's norm and the clients' data-weighted
        mean squared gradient norm."""
        n = sum(a.client.num_examples for a in accepted)
        self.history.update_norms.append(float(step.norm()))
        self.history.grad_sq_norms.append(sum(a.client.num_examples * a.client.grad_sq_norm for a in accepted) / n if n else float("nan"))

    def _new_stats(self, server_round: int) -> RoundStats:
        stats = RoundStats(server_round)
        if server_round == 1:
            stats.overhead_up, stats.overhead_down = self._setup_overhead
        return stats

    # -- asynchronous rounds (FedBuff) -------------------------------------------------------------

    def async_round(self, server_round: int, grid: Grid) -> None:
        """One server update of FedBuff: keep ``concurrency`` clients training (each on the
        model current when it starts; it runs at once, as its result depends on nothing that
        happens later), then take arrivals in simulated-time order until ``buffer_size``
        fresh ones are in, each weighted 1 / sqrt(1 + staleness)."""
        stats = self._new_stats(server_round)
        self.begin_round()
        busy = {a.node for *_, a in self._in_flight}
        capacity = self.policy.concurrency or max(1, round(self.fraction * len(self._partition_of)))
        nodes, _ = self.cohort(grid, server_round, exclude=busy)
        nodes = nodes[: max(0, capacity - len(busy))]
        if nodes:
            arrivals = self.receive(grid.send_and_receive(self.configure_async(server_round, nodes), timeout=self.timeout))
            self.timelines(arrivals)
            for a in arrivals:
                heapq.heappush(self._in_flight, (a.timeline.uploaded, self._seq, a))
                self._seq += 1
        stats.failures += self._round_failures
        accepted: list[Arrival] = []
        while self._in_flight and len(accepted) < self.policy.buffer_size:
            _, _, a = heapq.heappop(self._in_flight)
            staleness = self._version - a.base_version
            if staleness > self.policy.max_staleness:
                stats.failures.append(Failure(a.client.partition_id, f"stale: {staleness} versions behind", a.client.bytes_down, a.client.bytes_up))
                continue
            a.client = replace(a.client, staleness=staleness)
            accepted.append(a)
        if self.usable(stats, len(accepted)):
            self.aggregate(stats, accepted, lambda a: RoundPolicy.staleness_weight(a.client.staleness))
            self.algorithm.server_update([a.extras for a in accepted], len(self._partition_of))
        else:
            stats.skipped = True
        self.finish(stats, accepted)
        self.rounds[server_round] = stats

    def configure_async(self, server_round: int, nodes: list[int]) -> list[Message]:
        """Train messages for clients starting now (the FedAvg downlink of the current model)."""
        config = self.round_config(ConfigRecord(), server_round)
        ratios = self.client_ratios(nodes, server_round)
        messages = []
        for node, down in zip(nodes, self._downlink_records(nodes)):
            node_config = ConfigRecord({**config, M.RATIO: ratios[node]}) if node in ratios else config
            if (msg := self.dispatch(node, {M.DOWN: down, M.CONFIG: node_config}, server_round, M.DOWN)) is not None:
                messages.append(msg)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # evaluation is centralized, on the server's test set

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
