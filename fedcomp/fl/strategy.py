"""CompressedFedAvg: FedAvg whose traffic in both directions is a compressor's real bytes.

Per round: sample ``fraction`` of the nodes and send each the global model; each client
trains locally and returns its model update Delta_i = w_i - w (local minus received global)
encoded with the uplink compressor (Q_W); the server decodes the updates and applies

    w <- w + server_lr * sum_i n_i Delta_i / sum_i n_i

(n_i: client i's number of training samples). Every byte counted is ``len(payload)``.

Downlink (``downlink``):
  ``model``  -- the global model coded by the downlink compressor, to every sampled client.
               Clients hold no model between rounds. Right for dense casts (fp32/fp16/bf16).
  ``update`` -- bidirectional compression (Dutta et al. Algorithm 1): the server codes its step
               with the downlink compressor Q_M (with its own error feedback if configured)
               and applies the *decoded* step to w, so w is exactly what in-sync clients hold.
               Clients keep a replica of w; a sampled client whose replica is not at the
               previous version (first round, or it missed rounds) first receives w in fp32,
               and those bytes are counted too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcomp.allocation.controllers import History, RatioController
from fedcomp.compression import Compressor, build
from fedcomp.fl import messages as M
from fedcomp.fl.schedule import TrainSchedule
from fedcomp.metrics import ClientRound, RoundStats
from fedcomp.models import StateLayout
from fedcomp.network import NetworkModel

DOWNLINK_MODES = ("model", "update")


class CompressedFedAvg(Strategy):
    def __init__(
        self, *, up: Compressor, down: Compressor, network: NetworkModel, fraction: float = 1.0,
        seed: int = 0, server_lr: float = 1.0, downlink: str = "model", schedule: TrainSchedule | None = None,
        controller: RatioController | None = None, weights: np.ndarray | None = None,
    ) -> None:
        if downlink not in DOWNLINK_MODES:
            raise ValueError(f"downlink must be 'model' or 'update', got {downlink!r}")
        self.up = up
        self.down = down
        self.downlink = downlink
        self.network = network
        self.fraction = fraction
        self.seed = seed
        self.server_lr = server_lr
        self.schedule = schedule or TrainSchedule(base=float("nan"))
        self.controller = controller
        self.history = History(weights=np.asarray(weights if weights is not None else []))
        self._partition_of: dict[int, int] = {}  # node -> partition id
        self._ratios: dict[int, float] = {}  # node -> this round's ratio
        self.rounds: dict[int, RoundStats] = {}
        self._layout: StateLayout | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._global = torch.empty(0)
        self._down_bytes: dict[int, int] = {}
        self._full = build("identity")
        self._version = 0  # number of global updates applied (downlink: update)
        self._pending: bytes | None = None  # coded step from version - 1 to version
        self._synced: dict[int, int] = {}  # node -> version of its replica

    def summary(self) -> None:
        pass  # fedcomp reports through its own metrics files

    def sample(self, node_ids: list[int], server_round: int) -> list[int]:
        """Draw ``fraction`` of the nodes without replacement, reproducibly per (seed, round)."""
        node_ids = sorted(node_ids)
        m = max(1, round(self.fraction * len(node_ids)))
        picked = np.random.default_rng([self.seed, server_round]).choice(len(node_ids), size=m, replace=False)
        # Index, not choose from, the ids: Flower's are 64-bit and must stay Python ints.
        return [node_ids[i] for i in sorted(picked)]

    def apply_update(self, update: torch.Tensor) -> torch.Tensor:
        """The step added to the global model, given the data-weighted mean update.
        Override for server optimisers (momentum, Adam, ...)."""
        return self.server_lr * update

    def client_ratios(self, nodes: list[int], server_round: int, grid: Grid) -> dict[int, float]:
        """This round's controller ratios by node ({} without a controller). The first call
        asks every node for its partition id (a QUERY exchange of a few bytes, not counted as
        payload), since controllers reason about partitions, Flower about nodes."""
        if self.controller is None:
            return {}
        if any(n not in self._partition_of for n in nodes):
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in grid.get_node_ids()]
            for reply in grid.send_and_receive(queries):
                self._partition_of[reply.metadata.src_node_id] = int(reply.content[M.METRICS]["partition-id"])
        by_partition = self.controller.ratios(server_round, [self._partition_of[n] for n in nodes], self.history)
        self._ratios = {n: float(by_partition[self._partition_of[n]]) for n in nodes}
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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._state = arrays.to_torch_state_dict()
        if self._layout is None:
            self._layout = StateLayout.of(self._state)
        self._global = self._layout.flatten(self._state)
        config = self.round_config(config, server_round)
        nodes = self.sample(list(grid.get_node_ids()), server_round)
        ratios = self.client_ratios(nodes, server_round, grid)
        messages = []
        for node_id, down in zip(nodes, self._downlink_records(nodes)):
            self._down_bytes[node_id] = len(down[M.PAYLOAD])
            node_config = ConfigRecord({**config, M.RATIO: ratios[node_id]}) if node_id in ratios else config
            content = RecordDict({M.DOWN: down, M.CONFIG: node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        return messages

    def _in_sync(self, node_id: int) -> bool:
        """Whether the node's replica is one version behind, so the pending step brings it level."""
        return self._pending is not None and self._synced.get(node_id) == self._version - 1

    def _downlink_records(self, nodes: list[int]) -> list[ConfigRecord]:
        if self.downlink == "model":
            payload = self.down.compress(self._global)
            return [ConfigRecord({M.PAYLOAD: payload, M.KIND: M.MODEL, M.VERSION: self._version})] * len(nodes)
        full = None
        records = []
        for node_id in nodes:
            if self._in_sync(node_id):
                payload, kind = self._pending, M.DELTA
            else:
                full = full or self._full.compress(self._global)
                payload, kind = full, M.FULL
            records.append(ConfigRecord({M.PAYLOAD: payload, M.KIND: kind, M.VERSION: self._version}))
            self._synced[node_id] = self._version
        return records

    def client_round(self, reply: Message, bytes_up: int) -> ClientRound:
        """One client's record of the round, from its reply and the bytes it moved."""
        metrics = reply.content[M.METRICS]
        node = reply.metadata.src_node_id
        return ClientRound(
            partition_id=int(metrics["partition-id"]),
            bytes_up=bytes_up,
            bytes_down=self._down_bytes[node],
            num_examples=int(metrics["num-examples"]),
            train_loss=float(metrics["train-loss"]),
            compute_s=float(metrics["compute-s"]),
            ratio=self._ratios.get(node),
            grad_sq_norm=float(metrics["grad-sq-norm"]),
        )

    def round_time(self, stats: RoundStats) -> float:
        """Simulated length of a synchronous round: its slowest client's exchange."""
        return self.network.round_time({c.partition_id: (c.bytes_up, c.bytes_down, c.compute_s) for c in stats.clients})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = RoundStats(server_round)
        total = torch.zeros_like(self._global)
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"client on node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            payload = reply.content[M.UP][M.PAYLOAD]
            stats.clients.append(self.client_round(reply, len(payload)))
            total += stats.clients[-1].num_examples * self.up.decompress(payload)
        if not stats.clients:
            raise RuntimeError(f"round {server_round}: no client replied")
        num_examples = sum(c.num_examples for c in stats.clients)
        step = self.apply_update(total / num_examples)
        self.history.update_norms.append(float(step.norm()))
        self.history.grad_sq_norms.append(stats.grad_sq_norm)
        if self.downlink == "model":
            self._global += step
        else:
            self.down.set_round(server_round)
            self._pending = self.down.compress(step)
            self._global += self.down.decompress(self._pending)
            self._version += 1
        stats.sim_time_s = self.round_time(stats)
        self.rounds[server_round] = stats
        self._layout.load(self._state, self._global)
        return ArrayRecord(self._state), MetricRecord({"train-loss": stats.train_loss, "num-examples": num_examples})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is centralized, on the server's test set

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
