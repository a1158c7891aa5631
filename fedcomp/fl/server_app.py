"""The ServerApp: build the strategy from the config and run the rounds on a Flower Grid.

``make_server_app(cfg, out_dir)`` binds a composed config; the module-level ``app`` is what
``flwr run`` loads, reading ``overrides`` and ``output-dir`` from the run config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from hydra.utils import instantiate
from omegaconf import DictConfig

from fedcomp.compression import build
from fedcomp.config.plugins import build_target
from fedcomp.fl.checkpoint import checkpoint_round, load_checkpoint, save_checkpoint
from fedcomp.fl.client_app import config_from_overrides
from fedcomp.fl.local import evaluate
from fedcomp.fl.runtime import Runtime, get_runtime
from fedcomp.fl.schedule import TrainSchedule
from fedcomp.metrics import MetricsRecorder
from fedcomp.network.system import SystemModel
from fedcomp.progress import RoundProgress


def build_strategy(cfg: DictConfig, rt: Runtime) -> Strategy:
    """The configured strategy class with what the runner supplies: compressors, the system
    model (profiles, FLOPs, codec times), sampling fraction, seed, downlink mode, the
    local-training schedule, the ratio controller, the partition's sizes and the seal."""
    # _partial_: Hydra would turn the objects passed below into configs.
    return instantiate(cfg.strategy, _partial_=True)(
        up=rt.new_compressor("up"),
        down=rt.new_compressor("down"),
        system=SystemModel.from_config(cfg.network, cfg.simulation.num_clients, cfg.seed, rt.layout.numel, rt.training_flops),
        fraction=cfg.simulation.fraction,
        seed=cfg.seed,
        downlink=cfg.compressor.downlink,
        schedule=TrainSchedule.from_config(cfg.train, cfg.num_rounds),
        controller=instantiate(cfg.controller) if cfg.controller.get("_target_") else None,
        sizes=rt.partition.sizes,
        seal=rt.seal,
        algorithm=build_target(cfg.client) if cfg.get("client") and cfg.client.get("_target_") else None,
    )


def run_server(grid: Grid, cfg: DictConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds on ``grid``; write metrics to ``out_dir``; return the
    summary. ``resume``: continue from ``out_dir``'s checkpoint (inline engine)."""
    if not cfg.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    _wait_for_nodes(grid, cfg.simulation.num_clients)
    rt = get_runtime(cfg)
    dense = len(build("identity").compress(torch.zeros(rt.layout.numel)))
    done = checkpoint_round(out_dir) if resume else 0
    recorder = MetricsRecorder(out_dir, cfg, cfg.target_accuracy, dense_bytes=dense, resume_after=done)
    recorder.save_partition(rt.partition)
    strategy = build_strategy(cfg, rt)
    eval_model = rt.new_model()
    initial_accuracy, _ = evaluate(eval_model, rt.test, cfg.train.eval_batch_size)
    initial = ArrayRecord({k: v.cpu() for k, v in eval_model.state_dict().items()})

    stop = cfg.simulation.get("stop_after_round")

    with RoundProgress(cfg.num_rounds, enabled=cfg.progress, done=done) as progress:

        def on_round(server_round: int) -> None:
            acc = loss = None
            if server_round == cfg.num_rounds or server_round % cfg.eval_every == 0 or server_round == stop:
                eval_model.load_state_dict(strategy.global_state())
                acc, loss = evaluate(eval_model, rt.test, cfg.train.eval_batch_size)
            progress.update(recorder.record(strategy.rounds[server_round], acc, loss))
            if (cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0) or server_round == stop:
                save_checkpoint(out_dir, strategy, grid, server_round)

        restore = (lambda: load_checkpoint(out_dir, strategy, grid)) if resume else None
        strategy.run(grid, initial, cfg.num_rounds, on_round, first_round=done + 1, restore=restore, stop_after=stop)
    save_model(strategy, out_dir)
    if strategy.stop_reason:
        return recorder.finish(initial_accuracy, "diverged", strategy.stop_reason)
    if stop is not None and stop < cfg.num_rounds:
        return recorder.finish(initial_accuracy, "stopped", f"simulation.stop_after_round={stop}; `fedcomp resume {out_dir}` continues")
    return recorder.finish(initial_accuracy, resumed_from=done)


def save_model(strategy, out_dir: str | Path) -> None:
    """The final global model: model.safetensors (tensors only, nothing executable)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in strategy.global_state().items()}, str(Path(out_dir) / "model.safetensors"))


def _wait_for_nodes(grid: Grid, expected: int, timeout_s: float = 300.0) -> None:
    """Under ``flwr run`` SuperNodes may connect after the ServerApp starts; each node's
    ``partition-id`` indexes one of ``simulation.num_clients`` partitions, so all must be there."""
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{connected} of simulation.num_clients={expected} nodes connected after {timeout_s:.0f} s")
        time.sleep(1.0)


def make_server_app(cfg: DictConfig | None = None, out_dir: str | Path | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_overrides(str(context.run_config.get("overrides", "")))
        # under `flwr run` every run gets its own directory, named by Flower's run id
        where = out_dir if out_dir is not None else Path(str(context.run_config.get("output-dir", "outputs/flwr"))) / str(context.run_id)
        run_server(grid, run_cfg, where)

    return app


app = make_server_app()
