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
state out of the server's reach, so checkpoints need fedcomp's own engines (inline, pool).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load, save, save_file

FORMAT = 1
NAME = "checkpoint.safetensors"


def save_checkpoint(out_dir: str | Path, strategy, grid, server_round: int) -> Path:
    tensors, meta = strategy.state_dict()
    out = {f"server/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    clients, numbers, aliases = _flatten(grid.client_snapshots())
    out |= {f"client/{k}": t for k, t in clients.items()}
    path = Path(out_dir) / NAME
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"format": str(FORMAT), "round": str(server_round), "server": json.dumps(meta),
                                       "clients": json.dumps(numbers), "aliases": json.dumps(aliases)})
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
            (server if part == "server" else clients)[rest] = f.get_tensor(key)
    strategy.load_state_dict(server, json.loads(meta["server"]))
    grid.restore_clients(_unflatten(clients, json.loads(meta["clients"]), json.loads(meta.get("aliases", "{}"))))
    return int(meta["round"])


def _flatten(snapshots: dict) -> tuple[dict, dict, dict]:
    """Client snapshots as flat tensors ``node/group/key``, numbers per node (JSON) and aliases:
    a tensor several clients share (HGC's in-sync replicas and predictors) is stored once and
    named by the others, and shared again when loaded."""
    tensors, aliases, first = {}, {}, {}
    for node, (groups, _) in snapshots.items():
        for group, g in groups.items():
            for key, t in g.items():
                name, ident = f"{node}/{group}/{key}", (t.data_ptr(), t.shape, t.stride(), t.dtype)
                if t.numel() and ident in first:
                    aliases[name] = first[ident]
                else:
                    first[ident], tensors[name] = name, t.contiguous()
    return tensors, {str(node): numbers for node, (_, numbers) in snapshots.items()}, aliases


def _unflatten(tensors: dict, numbers: dict, aliases: dict) -> dict:
    snapshots = {int(node): ({}, values) for node, values in numbers.items()}
    for name in [*tensors, *aliases]:
        node, group, key = name.split("/", 2)
        t = tensors[aliases[name]] if name in aliases else tensors[name]
        snapshots.setdefault(int(node), ({}, {}))[0].setdefault(group, {})[key] = t
    return snapshots


def pack_snapshots(snapshots: dict) -> list[bytes]:
    """Client snapshots as [safetensors bytes, JSON numbers, JSON aliases] (between a pool
    worker and the server process)."""
    tensors, numbers, aliases = _flatten(snapshots)
    return [save(tensors), json.dumps(numbers).encode(), json.dumps(aliases).encode()]


def unpack_snapshots(blobs: list[bytes]) -> dict:
    return _unflatten(load(blobs[0]), json.loads(blobs[1]), json.loads(blobs[2]))


def resume(args: list[str]) -> int:
    """``fedcomp resume RUN_DIR [key=value ...]``: continue a run from its checkpoint, with the
    config it was started with (``RUN_DIR/.hydra/config.yaml``) and any overrides."""
    from fedcomp.config import ConfigError, register_schema, validate
    from fedcomp.fl.engine import run_experiment

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
    summary = run_experiment(cfg, run_dir, resume=True)
    print(f"resumed at round {summary.get('resumed_from', 0) + 1}: final accuracy {summary['final_accuracy']} | results in {run_dir}")
    return 0 if summary["status"] in ("ok", "stopped") else 1
