"""The ClientApp: decode the global model, train locally, send the encoded update.

``make_client_app(cfg)`` binds a composed config (Hydra CLI, in-process engines). The module-
level ``app`` is what ``flwr run`` loads: it composes the config from the run config's
``overrides`` string (Hydra override syntax), so both paths run the same experiment.

Per-client state lives with the node's Flower ``Context`` between rounds
(``fedcomp.fl.client_state``): the uplink compressor's state (error feedback), the local
optimizer's momentum buffers (``train.optimizer_state: persistent``), model replicas and
HGC's buffers.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedcomp import vectors
from fedcomp.config import compose_config
from fedcomp.fl import messages as M
from fedcomp.fl.client_round import apply_resets, client_seed, open_payload, reply, train_round, uplink_compressor
from fedcomp.fl.client_state import ClientState, client_state
from fedcomp.fl.faults import with_faults
from fedcomp.fl.hgc_client import hgc_round
from fedcomp.fl.runtime import Runtime, get_runtime


def receive_model(rt: Runtime, down: ConfigRecord, state: ClientState) -> torch.Tensor:
    """The global model this client now holds, from the downlink record (see strategy docs),
    to read: under ``downlink: model`` it is the round's one decoded vector every client shares
    (``Runtime.decode_shared``). Payloads must describe the model's flat float32 vector."""
    kind, version = down[M.KIND], int(down[M.VERSION])
    expect = ((rt.layout.numel,), torch.float32)
    payload = open_payload(rt, down)
    if kind == M.MODEL:
        return rt.decode_shared(rt.compressor("down"), payload, expect)
    if kind == M.FULL:
        replica = vectors.clone(rt.decode_shared(rt.full_codec, payload, expect))
    elif kind == M.DELTA:
        held = state.number(M.REPLICA_VERSION)
        if held != version - 1:
            raise RuntimeError(f"delta to version {version} sent to a client holding version {held}")
        step = rt.decode_shared(rt.compressor("down"), payload, expect)
        replica = state.tensor(M.REPLICA, "w") + step
    else:
        raise ValueError(f"unknown downlink kind {kind!r}")
    state.put(M.REPLICA, {"w": replica})
    state.set_number(M.REPLICA_VERSION, version)
    return replica


def train_on_client(cfg: DictConfig, msg: Message, context: Context) -> Message:
    rt = get_runtime(cfg)
    partition_id = int(context.node_config["partition-id"])
    config = msg.content[M.CONFIG]
    seed = client_seed(rt.seed, config, partition_id)
    state = client_state(context, rt.reduced_state)
    apply_resets(state, config)
    if M.HGC in msg.content:
        return hgc_round(rt, msg, state, partition_id, seed)
    start = time.perf_counter()
    received = receive_model(rt, msg.content[M.DOWN], state)
    decode_s = time.perf_counter() - start
    # Whether the compressor takes the momentum is the round's setting, not the client's state;
    # the compressor is loaded with this client's state only after training, since under the
    # batched engine other clients' rounds run while this one waits for its cohort.
    momentum_taken = rt.compressor("up").take_momentum(float(config[M.MOMENTUM]))
    result = train_round(rt, received, state, partition_id, seed, config, msg.content.get(M.EXTRA), momentum_taken=momentum_taken)
    up = uplink_compressor(rt, state, seed, config)
    start = time.perf_counter()
    payload = up.compress_donated(result.update)  # this round's own tensor, read by nothing after
    encode_s = time.perf_counter() - start
    state.put(M.UP_STATE, up.state())
    return reply(rt, msg, payload, result, partition_id, encode_s, decode_s)


@lru_cache(maxsize=4)
def config_from_overrides(overrides: str) -> DictConfig:
    return compose_config(overrides)


def make_client_app(cfg: DictConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg if cfg is not None else config_from_overrides(str(context.run_config.get("overrides", "")))
        if get_runtime(run_cfg).faults:
            return with_faults(run_cfg, msg, context, lambda m, c: train_on_client(run_cfg, m, c))
        return train_on_client(run_cfg, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which partition this node trains on (ratio controllers need it)."""
        metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
        return Message(RecordDict({M.METRICS: metrics}), reply_to=msg)

    return app


app = make_client_app()
