"""Checkpoints: a run's whole state between rounds, in one versioned file, and resuming it.

``checkpoint.safetensors`` holds tensors only (nothing executable is ever loaded): the server's
model, pending downlink, downlink error feedback, controller inputs, HGC predictor and velocity,
the client algorithm's server state, and every client's state (error feedback, optimizer
momentum, replicas, HGC buffers) as the inline engine holds it; the rest (versions, the
simulated clock, which client holds which version, controller state, round) is JSON in the
file's metadata. Everything else a round uses is a pure function of (seed, round, client), so
a resumed run continues bit for bit (tested: 6 rounds straight == 3 rounds, stop, resume 3).

Written every ``checkpoint_every`` rounds and when ``simulation.stop_after_round`` ends a run
early; ``fedcomp resume RUN_DIR [overrides]`` continues from it. Flower's engines keep client
state out of the server's reach, so checkpoints need the inline engine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from fedcomp.fl.client_state import client_state

FORMAT = 1
NAME = "checkpoint.safetensors"


def save_checkpoint(out_dir: str | Path, strategy, grid, server_round: int) -> Path:
    tensors, meta = strategy.state_dict()
    out = {f"server/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    numbers = {}
    for node, context in grid._contexts.items():
        groups, numbers[str(node)] = client_state(context).snapshot()
        out |= {f"client/{node}/{group}/{key}": t.contiguous() for group, g in groups.items() for key, t in g.items()}
    path = Path(out_dir) / NAME
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"format": str(FORMAT), "round": str(server_round), "server": json.dumps(meta),
                                       "clients": json.dumps(numbers)})
    os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint
    return path


def checkpoint_round(run_dir: str | Path) -> int:
    with safe_open(str(Path(run_dir) / NAME), framework="pt") as f:
        meta = f.metadata()
    if int(meta.get("format", -1)) != FORMAT:
        raise ValueError(f"{run_dir}: checkpoint format {meta.get('format')} (this build reads {FORMAT})")
    return int(meta["round"])


def load_checkpoint(run_dir: str | Path, strategy, grid) -> int:
    """Restore the server and every client from ``run_dir``'s checkpoint; return its round."""
    server, clients = {}, {}
    with safe_open(str(Path(run_dir) / NAME), framework="pt") as f:
        meta = f.metadata()
        for key in f.keys():
            part, rest = key.split("/", 1)
            if part == "server":
                server[rest] = f.get_tensor(key)
            else:
                node, group, name = rest.split("/", 2)
                clients.setdefault(int(node), {}).setdefault(group, {})[name] = f.get_tensor(key)
    strategy.load_state_dict(server, json.loads(meta["server"]))
    numbers = json.loads(meta["clients"])
    for node, context in grid._contexts.items():
        client_state(context).restore(clients.get(node, {}), numbers.get(str(node), {}))
    return int(meta["round"])


def resume(args: list[str]) -> int:
    """``fedcomp resume RUN_DIR [key=value ...]``: continue a run from its checkpoint, with the
    config it was started with (``RUN_DIR/.hydra/config.yaml``) and any overrides."""
    from fedcomp.config import ConfigError, register_schema, validate
    from fedcomp.fl.engine import run_inline

    if not args or not (Path(args[0]) / NAME).is_file():
        print("usage: fedcomp resume RUN_DIR [key=value ...]  (RUN_DIR must hold a checkpoint.safetensors)")
        return 2
    run_dir = Path(args[0])
    register_schema()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.simulation.stop_after_round = None  # the stop that interrupted it is done with; an override may set another
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args[1:]))
    try:
        validate(cfg)
    except ConfigError as exc:
        print(f"fedcomp: invalid config: {exc}")
        return 2
    summary = run_inline(cfg, run_dir, resume=True)
    print(f"resumed at round {summary.get('resumed_from', 0) + 1}: final accuracy {summary['final_accuracy']} | results in {run_dir}")
    return 0 if summary["status"] in ("ok", "stopped") else 1
