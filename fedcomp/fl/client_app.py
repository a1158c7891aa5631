"""The ClientApp: decode the global model, train locally, send the encoded update.

``make_client_app(cfg)`` binds a composed config (Hydra CLI, in-process engines). The module-
level ``app`` is what ``flwr run`` loads: it composes the config from the run config's
``overrides`` string (Hydra override syntax), so both paths run the same experiment.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedcomp.config import compose_config
from fedcomp.fl import messages as M
from fedcomp.fl.hgc_client import hgc_round
from fedcomp.fl.local import mean_gradient_sq_norm, train_local
from fedcomp.fl.runtime import Runtime, get_runtime


def receive_model(rt: Runtime, down: ConfigRecord, state: RecordDict) -> torch.Tensor:
    """The global model this client now holds, from the downlink record (see strategy docs)."""
    kind, version = down[M.KIND], int(down[M.VERSION])
    if kind == M.MODEL:
        return rt.compressor("down").decompress(down[M.PAYLOAD]).reshape(-1).float()
    if kind == M.FULL:
        replica = rt.full_codec.decompress(down[M.PAYLOAD]).reshape(-1).float()
    elif kind == M.DELTA:
        held = int(state[M.REPLICA_VERSION][M.VERSION]) if M.REPLICA_VERSION in state else None
        if held != version - 1:
            raise RuntimeError(f"delta to version {version} sent to a client holding version {held}")
        step = rt.compressor("down").decompress(down[M.PAYLOAD]).reshape(-1).float()
        replica = torch.from_numpy(state[M.REPLICA]["w"].numpy()) + step
    else:
        raise ValueError(f"unknown downlink kind {kind!r}")
    state[M.REPLICA] = ArrayRecord({"w": replica})
    state[M.REPLICA_VERSION] = ConfigRecord({M.VERSION: version})
    return replica


def compress_update(
    rt: Runtime, update: torch.Tensor, state: RecordDict, seed: int, server_round: int, ratio: float | None,
) -> bytes:
    """Uplink compression with this client's own compressor state (error feedback, ...)."""
    up = rt.compressor("up")
    up.load_state(state[M.UP_STATE].to_torch_state_dict() if M.UP_STATE in state else {})
    up.reseed(seed)
    up.set_round(server_round)
    if ratio is not None:
        up.set_ratio(ratio)
    payload = up.compress(update)
    kept = up.state()
    if kept:
        state[M.UP_STATE] = ArrayRecord(kept)
    return payload


def round_training(rt: Runtime, config: ConfigRecord) -> dict:
    """Local-training settings for this round: the config's, with the server's learning rate."""
    return {**rt.local_training, "lr": float(config["lr"])}


def train_on_client(cfg: DictConfig, msg: Message, context: Context) -> Message:
    rt = get_runtime(cfg)
    partition_id = int(context.node_config["partition-id"])
    config = msg.content[M.CONFIG]
    seed = int(np.random.SeedSequence([cfg.seed, int(config["server-round"]), partition_id]).generate_state(1)[0])
    if M.HGC in msg.content:
        return hgc_round(rt, msg, context.state, partition_id, seed, round_training(rt, config))
    received = receive_model(rt, msg.content[M.DOWN], context.state)
    rt.layout.load(rt.model, received)
    indices = rt.client_indices(partition_id)
    generator = torch.Generator().manual_seed(seed)
    training = round_training(rt, config)
    start = time.perf_counter()
    loss = train_local(rt.model, rt.train.x, rt.train.y, indices, generator=generator, **training)
    compute_s = time.perf_counter() - start
    update = rt.flat_model() - received
    ratio = float(config["ratio"]) if "ratio" in config else None
    payload = compress_update(rt, update, context.state, seed, int(config["server-round"]), ratio)
    metrics = MetricRecord({
        "num-examples": len(indices), "train-loss": loss, "compute-s": compute_s, "partition-id": partition_id,
        "grad-sq-norm": mean_gradient_sq_norm(update, len(indices), training),
    })
    return Message(RecordDict({M.UP: ConfigRecord({M.PAYLOAD: payload}), M.METRICS: metrics}), reply_to=msg)


@lru_cache(maxsize=4)
def config_from_overrides(overrides: str) -> DictConfig:
    return compose_config(overrides)


def make_client_app(cfg: DictConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg if cfg is not None else config_from_overrides(str(context.run_config.get("overrides", "")))
        return train_on_client(run_cfg, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which partition this node trains on (ratio controllers need it)."""
        metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({M.METRICS: metrics}), reply_to=msg)

    return app


app = make_client_app()
