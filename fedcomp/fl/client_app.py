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
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedcomp.config import compose_config
from fedcomp.fl import messages as M
from fedcomp.fl.local import train_local
from fedcomp.fl.runtime import get_runtime


def train_on_client(cfg: DictConfig, msg: Message, partition_id: int) -> Message:
    rt = get_runtime(cfg)
    config = msg.content[M.CONFIG]
    received = rt.compressor("down").decompress(msg.content[M.DOWN][M.PAYLOAD])
    rt.layout.load(rt.model, received)
    indices = rt.client_indices(partition_id)
    seed = np.random.SeedSequence([cfg.seed, int(config["server-round"]), partition_id]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    start = time.perf_counter()
    loss = train_local(rt.model, rt.train.x, rt.train.y, indices, generator=generator, **rt.local_training)
    compute_s = time.perf_counter() - start
    update = rt.layout.flatten(rt.model) - received
    payload = rt.compressor("up").compress(update)
    metrics = MetricRecord({
        "num-examples": len(indices), "train-loss": loss, "compute-s": compute_s, "partition-id": partition_id,
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
        return train_on_client(run_cfg, msg, int(context.node_config["partition-id"]))

    return app


app = make_client_app()
