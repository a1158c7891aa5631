"""CompressedFedAvg: FedAvg whose traffic in both directions is a compressor's real bytes.

Per round: sample ``fraction`` of the nodes; encode the global model with the downlink
compressor once and send that payload to each sampled client; each client trains locally and
returns its model update Delta_i = w_i - w (local minus received global) encoded with the
uplink compressor; the server decodes the updates and applies

    w <- w + server_lr * sum_i n_i Delta_i / sum_i n_i

(n_i: client i's number of training samples). Every byte counted is ``len(payload)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcomp.compression import Compressor
from fedcomp.fl import messages as M
from fedcomp.metrics import ClientRound, RoundStats
from fedcomp.models import StateLayout
from fedcomp.network import NetworkModel


class CompressedFedAvg(Strategy):
    def __init__(
        self, *, up: Compressor, down: Compressor, network: NetworkModel, fraction: float = 1.0,
        seed: int = 0, server_lr: float = 1.0,
    ) -> None:
        self.up = up
        self.down = down
        self.network = network
        self.fraction = fraction
        self.seed = seed
        self.server_lr = server_lr
        self.rounds: dict[int, RoundStats] = {}
        self._layout: StateLayout | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._global = torch.empty(0)
        self._down_bytes = 0

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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._state = arrays.to_torch_state_dict()
        if self._layout is None:
            self._layout = StateLayout.of(self._state)
        self._global = self._layout.flatten(self._state)
        payload = self.down.compress(self._global)
        self._down_bytes = len(payload)
        config = ConfigRecord({**config, "server-round": server_round})
        return [
            Message(
                RecordDict({M.DOWN: ConfigRecord({M.PAYLOAD: payload}), M.CONFIG: config}),
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
            )
            for node_id in self.sample(list(grid.get_node_ids()), server_round)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = RoundStats(server_round)
        total = torch.zeros_like(self._global)
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"client on node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            payload = reply.content[M.UP][M.PAYLOAD]
            metrics = reply.content[M.METRICS]
            n = int(metrics["num-examples"])
            total += n * self.up.decompress(payload)
            stats.clients.append(ClientRound(
                partition_id=int(metrics["partition-id"]),
                bytes_up=len(payload),
                bytes_down=self._down_bytes,
                num_examples=n,
                train_loss=float(metrics["train-loss"]),
                compute_s=float(metrics["compute-s"]),
            ))
        if not stats.clients:
            raise RuntimeError(f"round {server_round}: no client replied")
        num_examples = sum(c.num_examples for c in stats.clients)
        self._global += self.apply_update(total / num_examples)
        stats.sim_time_s = self.network.round_time(
            {c.partition_id: (c.bytes_up, c.bytes_down, c.compute_s) for c in stats.clients}
        )
        self.rounds[server_round] = stats
        self._layout.load(self._state, self._global)
        return ArrayRecord(self._state), MetricRecord({"train-loss": stats.train_loss, "num-examples": num_examples})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is centralized, on the server's test set

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
