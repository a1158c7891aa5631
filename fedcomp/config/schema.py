"""Structured configs for Hydra and the value checks behind them.

The top-level schema (``ExperimentConfig``) puts Hydra in struct mode, so a misspelled
top-level or group key is refused while the command line is parsed. Each config group entry
is then checked against the dataclass for its ``name`` (unknown keys, wrong types, values out
of range), and every error names the dotted key, e.g. ``partition.alpha``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid configuration value; the message starts with the offending key."""


def _require(ok: bool, key: str, why: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why} (got {value!r})")


BACKENDS = ("inline", "pool", "batched", "batched_pool", "ray")

# Injectable client faults, described in fedcomp/fl/faults.py.
FAULT_KINDS = ("crash", "lose_down", "lose", "corrupt", "truncate", "wrong_shape", "nan_update", "nan_metrics", "forge_size")


@dataclass
class SimulationConfig:
    num_clients: int = 10
    fraction: float = 1.0
    # inline: Flower Messages delivered to the ClientApp in this process (the default);
    # pool: the same, on persistent worker processes training in parallel;
    # batched: a round's local training done as one vmapped computation per group of same-shaped
    # clients (models without batch norm or dropout; client algorithms' hooks train in turn);
    # batched_pool: pool workers, each training its share of a round's cohort as batched does;
    # ray: Flower's simulation engine (one Ray actor per client_cpus).
    backend: str = "inline"
    workers: Optional[int] = None  # pool: worker processes (null: the cores client_cpus threads fill)
    client_cpus: Optional[float] = None  # torch threads per client (inline: null = torch's default; pool: 1; ray: CPUs per actor)
    # Memory for client state (EF, momentum, replicas, HGC buffers) per run, spilled to files in
    # spill_dir (null: the system's temp dir) beyond it; null: unbounded.
    state_memory_gb: Optional[float] = None
    spill_dir: Optional[str] = None
    ef_dtype: str = "float32"  # bfloat16: error-feedback memory in half the bytes (a fidelity trade-off)
    client_gpus: float = 0.0
    # hmac: every payload carries an HMAC-SHA256 tag (32 bytes, counted); key from
    # integrity_key (hex) or, in simulation, derived from the seed.
    integrity: str = "none"
    integrity_key: Optional[str] = None
    # End the run cleanly after this round (a checkpoint is written; `fedcomp resume DIR` continues).
    stop_after_round: Optional[int] = None
    # Injected client faults (fedcomp/fl/faults.py): [{kind, clients: [partition ids], rounds: [..] | null}]
    faults: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, f in enumerate(self.faults):
            _require(isinstance(f, dict) and f.get("kind") in FAULT_KINDS and isinstance(f.get("clients"), list),
                     f"simulation.faults[{i}]", f"must be {{kind: one of {FAULT_KINDS}, clients: [ids], rounds: [..] or null}}", f)
        _require(self.integrity in ("none", "hmac"), "simulation.integrity", "must be none or hmac", self.integrity)
        _require(self.num_clients >= 1, "simulation.num_clients", "must be >= 1", self.num_clients)
        _require(0 < self.fraction <= 1, "simulation.fraction", "must be in (0, 1]", self.fraction)
        _require(self.backend in BACKENDS, "simulation.backend", f"must be one of {BACKENDS}", self.backend)
        _require(self.client_cpus is None or self.client_cpus > 0, "simulation.client_cpus", "must be > 0 or null", self.client_cpus)
        _require(self.workers is None or self.workers >= 1, "simulation.workers", "must be >= 1 or null", self.workers)
        _require(self.state_memory_gb is None or self.state_memory_gb > 0, "simulation.state_memory_gb", "must be > 0 or null", self.state_memory_gb)
        _require(self.ef_dtype in ("float32", "bfloat16"), "simulation.ef_dtype", "must be float32 or bfloat16", self.ef_dtype)
        _require(self.client_gpus >= 0, "simulation.client_gpus", "must be >= 0", self.client_gpus)


@dataclass
class TrainConfig:
    """Local training on each sampled client. ``steps`` (if set) overrides ``epochs``."""

    epochs: int = 1
    steps: Optional[int] = None
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    # [[round, momentum], ...]: from each listed round on, the clients' local momentum (SOFF's
    # 0 -> 0.3 -> 0.6 -> 0.9 ramp); before the first entry, ``momentum``.
    momentum_ramp: Optional[list[Any]] = None
    # fresh: a new optimizer every round (momentum lives within one local run); persistent: each
    # client keeps its momentum buffers across rounds in its Context (the HGC paper's recipe).
    optimizer_state: str = "fresh"
    weight_decay: float = 0.0
    # Step schedule: lr x lr_gamma at each milestone (fractions of num_rounds), e.g. [0.5, 0.75].
    lr_milestones: list[float] = field(default_factory=list)
    lr_gamma: float = 0.1
    eval_batch_size: int = 256
    # Where local training and evaluation run: cpu, cuda (cuda:N) or auto (cuda when available).
    # Compression selects and keeps its error feedback there too; only the values and indices
    # it chose come to the CPU to be coded.
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(self.device in ("cpu", "auto") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
                 "train.device", "must be cpu, cuda, cuda:N or auto", self.device)
        _require(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _require(self.steps is None or self.steps >= 1, "train.steps", "must be >= 1 or null", self.steps)
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _require(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)", self.momentum)
        _require(self.optimizer_state in ("fresh", "persistent"), "train.optimizer_state", "must be fresh or persistent", self.optimizer_state)
        ramp = self.momentum_ramp or []
        _require(all(isinstance(e, (list, tuple)) and len(e) == 2 and int(e[0]) == e[0] and e[0] >= 0 and 0 <= e[1] < 1 for e in ramp),
                 "train.momentum_ramp", "must be [[round >= 0, momentum in [0, 1)], ...]", self.momentum_ramp)
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _require(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1", self.eval_batch_size)
        _require(all(0 < m < 1 for m in self.lr_milestones), "train.lr_milestones", "must be fractions in (0, 1)", self.lr_milestones)
        _require(0 < self.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]", self.lr_gamma)


@dataclass
class ExperimentConfig:
    """Top-level schema; the groups are checked by their own dataclasses below."""

    dataset: Any = MISSING
    partition: Any = MISSING
    model: Any = MISSING
    strategy: Any = MISSING
    compressor: Any = MISSING
    network: Any = MISSING
    controller: Any = MISSING
    client: Any = MISSING  # the client algorithm (fedavg, fedprox, scaffold, or a _target_ of yours)
    num_rounds: int = 5
    seed: int = 0
    eval_every: int = 1
    target_accuracy: Optional[float] = None
    verbose: bool = False
    progress: bool = True
    name: Optional[str] = None  # the run's name (summary.json, reports)
    tags: list[str] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # modules imported first (user compressors, ...)
    checkpoint_every: int = 0  # rounds between checkpoints (0: only the final model is saved)
    resume: bool = False  # skip a run whose directory already holds a finished summary.json
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # csv (metrics.csv), tensorboard
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---- config groups -------------------------------------------------------------------------


@dataclass
class SyntheticParams:
    num_train: int = 2000
    num_test: int = 500
    shape: list[int] = field(default_factory=lambda: [1, 12, 12])
    num_classes: int = 10
    seed: int = 0
    noise: float = 1.0

    def __post_init__(self) -> None:
        _require(len(self.shape) == 3 and min(self.shape) >= 1, "dataset.synthetic.shape", "must be [channels, height, width]", self.shape)
        _require(self.num_train >= 1 and self.num_test >= 1, "dataset.synthetic.num_train", "and num_test must be >= 1", self.num_train)


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: Optional[str] = None
    download: bool = False
    synthetic: Optional[SyntheticParams] = None

    def __post_init__(self) -> None:
        known = ("fmnist", "mnist", "cifar10", "synthetic")
        _require(self.name in known, "dataset.name", f"must be one of {known}", self.name)
        _require(self.root is None or self.download or Path(self.root).expanduser().is_dir(), "dataset.root",
                 "no such directory (a named root is never replaced by another copy)", self.root)


@dataclass
class IidPartition:
    name: str = "iid"


@dataclass
class DirichletPartition:
    name: str = "dirichlet"
    alpha: float = 0.5
    min_samples: int = 1

    def __post_init__(self) -> None:
        _require(self.alpha > 0, "partition.alpha", "must be > 0", self.alpha)
        _require(self.min_samples >= 1, "partition.min_samples", "must be >= 1", self.min_samples)


@dataclass
class VolumeSkewPartition:
    name: str = "volume_skew"
    skew_ratio: float = 10.0
    label_alpha: Optional[float] = None
    min_samples: int = 1
    series: str = "arithmetic"

    def __post_init__(self) -> None:
        _require(self.skew_ratio >= 1, "partition.skew_ratio", "must be >= 1", self.skew_ratio)
        _require(self.series in ("arithmetic", "geometric"), "partition.series", "must be arithmetic or geometric", self.series)
        _require(self.label_alpha is None or self.label_alpha > 0, "partition.label_alpha", "must be > 0 or null", self.label_alpha)
        _require(self.min_samples >= 1, "partition.min_samples", "must be >= 1", self.min_samples)


@dataclass
class ShardsPartition:
    name: str = "shards"
    shards_per_client: int = 2

    def __post_init__(self) -> None:
        _require(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1", self.shards_per_client)


@dataclass
class ExplicitPartition:
    name: str = "explicit"
    fractions: list[float] = field(default_factory=lambda: [0.5] + [0.05] * 10)
    min_samples: int = 1

    def __post_init__(self) -> None:
        _require(bool(self.fractions) and min(self.fractions) > 0, "partition.fractions", "must be positive fractions", self.fractions)


PARTITIONS = {
    "explicit": ExplicitPartition,
    "iid": IidPartition,
    "dirichlet": DirichletPartition,
    "volume_skew": VolumeSkewPartition,
    "shards": ShardsPartition,
}


@dataclass
class Heterogeneity:
    """How clients' profiles differ: ``none``; ``lognormal`` (bandwidths x exp(N(-s^2/2, s^2)),
    device speed likewise with ``compute_sigma``; mean factor 1); or ``csv`` (a trace: columns
    client and any of uplink_mbps, downlink_mbps, latency_ms, gflops, from_s)."""

    kind: str = "none"
    sigma: float = 0.5
    compute_sigma: float = 0.0
    path: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.kind in ("none", "lognormal", "csv"), "network.heterogeneity.kind", "must be none, lognormal or csv", self.kind)
        _require(self.sigma >= 0, "network.heterogeneity.sigma", "must be >= 0", self.sigma)
        _require(self.compute_sigma >= 0, "network.heterogeneity.compute_sigma", "must be >= 0", self.compute_sigma)
        _require(self.kind != "csv" or bool(self.path), "network.heterogeneity.path", "is required when kind=csv", self.path)
        _require(self.kind != "csv" or Path(self.path).is_file(), "network.heterogeneity.path", "no such file", self.path)


@dataclass
class AvailabilityConfig:
    """Which clients can be sampled: ``trace`` (CSV client, from_s, to_s: online intervals) and
    ``dropout`` (probability a sampled client drops out mid-round)."""

    dropout: float = 0.0
    trace: Optional[str] = None

    def __post_init__(self) -> None:
        _require(0 <= self.dropout < 1, "network.availability.dropout", "must be in [0, 1)", self.dropout)
        _require(self.trace is None or Path(self.trace).is_file(), "network.availability.trace", "no such file", self.trace)


@dataclass
class NetworkConfig:
    name: str = MISSING
    uplink_mbps: float = 1000.0
    downlink_mbps: float = 1000.0
    latency_ms: float = 0.0
    device_gflops: float = 50.0  # the clients' training throughput
    server_gflops: float = 50.0  # the server's, for decoding uploads
    # flops: compute time = training FLOPs / device speed (deterministic); measured: the host's clock.
    compute: str = "flops"
    # model: codec time from the calibrated table; measured: the host's clock; none: free.
    codec: str = "model"
    heterogeneity: Heterogeneity = field(default_factory=Heterogeneity)
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)

    def __post_init__(self) -> None:
        _require(self.uplink_mbps > 0, "network.uplink_mbps", "must be > 0", self.uplink_mbps)
        _require(self.downlink_mbps > 0, "network.downlink_mbps", "must be > 0", self.downlink_mbps)
        _require(self.latency_ms >= 0, "network.latency_ms", "must be >= 0", self.latency_ms)
        _require(self.device_gflops > 0, "network.device_gflops", "must be > 0", self.device_gflops)
        _require(self.server_gflops > 0, "network.server_gflops", "must be > 0", self.server_gflops)
        _require(self.compute in ("flops", "measured"), "network.compute", "must be flops or measured", self.compute)
        _require(self.codec in ("model", "measured", "none"), "network.codec", "must be model, measured or none", self.codec)


def register_schema() -> None:
    ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)


def _check_group(group: str, node: DictConfig, schema: type) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
        raise ConfigError(f"{group}.{key}: {exc.msg if hasattr(exc, 'msg') else exc}".split("\n")[0]) from None


def _check_kwargs(group: str, factory: Any, params: dict[str, Any], skip: int) -> None:
    """Refuse keys a factory does not take (``skip`` leading positional inputs)."""
    sig = inspect.signature(factory)
    accepted = list(sig.parameters)[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    for key in params:
        _require(key in accepted, f"{group}.{key}", f"unknown option; {group} takes {accepted}", params[key])


def validate(cfg: DictConfig) -> None:
    """Check every part of an experiment config; raise ``ConfigError`` naming the key."""
    from fedcomp.config.plugins import import_plugins
    from fedcomp.models.zoo import MODELS

    import_plugins(cfg)
    _require(cfg.num_rounds >= 1, "num_rounds", "must be >= 1", cfg.num_rounds)
    _require(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    _require(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0", cfg.checkpoint_every)
    _require(set(cfg.loggers) <= {"csv", "tensorboard"}, "loggers", "must list csv and/or tensorboard", list(cfg.loggers))
    stop = cfg.simulation.get("stop_after_round")
    _require(stop is None or stop >= 1, "simulation.stop_after_round", "must be >= 1 or null", stop)
    _require(not (cfg.checkpoint_every or stop) or cfg.simulation.backend != "ray", "checkpoint_every",
             "checkpoints need fedcomp's engines (inline, pool, batched, batched_pool): Flower's keep client state from the server", cfg.simulation.backend)
    _require(cfg.eval_every >= 1, "eval_every", "must be >= 1", cfg.eval_every)
    t = cfg.target_accuracy
    _require(t is None or 0 < t <= 1, "target_accuracy", "must be in (0, 1] or null", t)
    _check_group("simulation", cfg.simulation, SimulationConfig)
    _check_group("train", cfg.train, TrainConfig)
    if not cfg.dataset.get("_target_"):
        _check_group("dataset", cfg.dataset, DatasetConfig)
    _require(cfg.partition.get("name") in PARTITIONS, "partition.name", f"must be one of {list(PARTITIONS)}", cfg.partition.get("name"))
    _check_group("partition", cfg.partition, PARTITIONS[cfg.partition.name])
    _check_group("network", cfg.network, NetworkConfig)
    model = OmegaConf.to_container(cfg.model)
    if not model.get("_target_"):
        _require(model.get("name") in MODELS, "model.name", f"must be one of {sorted(MODELS)} or give _target_", model.get("name"))
        _check_kwargs("model", MODELS[model.pop("name")], model, skip=2)
    for direction in ("up", "down"):
        _require(direction in cfg.compressor, f"compressor.{direction}", "is required", None)
    downlink = cfg.compressor.get("downlink")
    _require(downlink in ("model", "update"), "compressor.downlink", "must be 'model' or 'update'", downlink)
    unknown = set(cfg.compressor) - {"up", "down", "downlink"}
    _require(not unknown, f"compressor.{sorted(unknown)[0] if unknown else ''}", "unknown option; compressor takes up, down, downlink", None)
    _require("_target_" in cfg.strategy, "strategy._target_", "is required (the strategy class)", None)
    from fedcomp.config.checks import cross_check  # builds the model and compressors: after the cheap checks

    cross_check(cfg)
