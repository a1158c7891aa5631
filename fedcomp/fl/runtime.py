"""Everything a process derives from the config once: data, partition, model, compressors.

Server and clients build the same ``Runtime`` from the same config, so the partition (a pure
function of the seed) and the model layout agree without being sent. One instance per config
per process is cached: Ray actors and the inline engine reuse it across rounds and clients.
Datasets and models live on ``train.device``; model vectors that cross the wire stay on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch
from omegaconf import DictConfig, OmegaConf

from fedcomp.compression import Compressor, build
from fedcomp.config import ConfigError
from fedcomp.config.plugins import build_target
from fedcomp.data import TensorData, load_dataset
from fedcomp.fl import messages as M
from fedcomp.fl.algorithms import ClientAlgorithm
from fedcomp.models import StateLayout, build_model
from fedcomp.network.compute import training_flops_per_sample
from fedcomp.partition import Partition, make_partition
from fedcomp.wire import Seal


@dataclass
class Runtime:
    cfg: DictConfig
    train: TensorData
    test: TensorData
    partition: Partition
    model: torch.nn.Module  # scratch model, reused for every local training run
    layout: StateLayout
    _compressors: dict[str, Compressor] = field(default_factory=dict)
    _last_shared: tuple | None = None  # (codec, expect, payload, decoded): see decode_shared

    @property
    def device(self) -> torch.device:
        return self.train.x.device

    def new_model(self) -> torch.nn.Module:
        model = build_model(self.cfg.model, self.train.input_shape, self.train.num_classes, self.cfg.seed)
        return model.to(self.device)

    def client_indices(self, partition_id: int) -> torch.Tensor:
        return torch.from_numpy(self.partition.indices[partition_id])

    def model_update(self, w: torch.Tensor) -> torch.Tensor:
        """The scratch model's floating-point state minus the flat vector ``w``: a new vector on
        the model's device."""
        trained = self.layout.flatten(self.model)
        return trained - w.to(trained.device)

    def flat_model(self) -> torch.Tensor:
        """The scratch model's parameters as one CPU vector (what compressors and the wire see)."""
        return self.layout.flatten(self.model).cpu()

    @cached_property
    def seed(self) -> int:
        """The run's seed (``cfg.seed``), read once: a DictConfig lookup is slow per client."""
        return int(self.cfg.seed)

    @cached_property
    def local_training(self) -> dict:
        """Keyword arguments of ``train_local`` from ``cfg.train``, as plain Python values."""
        t = self.cfg.train
        return dict(epochs=t.epochs, steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                    momentum=t.momentum, weight_decay=t.weight_decay)

    def compressor(self, direction: str) -> Compressor:
        """The process's compressor for ``direction`` ("up" or "down"), built once, for clients:
        their state is not kept here but loaded from and saved to each client's Context."""
        if direction not in self._compressors:
            self._compressors[direction] = self.new_compressor(direction)
        return self._compressors[direction]

    def new_compressor(self, direction: str) -> Compressor:
        """A compressor of its own (the server's, whose state, e.g. downlink error feedback,
        belongs to one run)."""
        return build_target(self.cfg.compressor[direction], sizes=self.layout.sizes)

    def decode_shared(self, codec: Compressor, payload: bytes, expect: tuple) -> torch.Tensor:
        """``codec.decompress(payload, *expect)`` for a payload every client of a round receives
        (the broadcast model, its step, a resync), decoded once per process: the in-process
        engines hand each client the same bytes object, which compares equal by identity, so
        later clients pay nothing. Every caller gets the same tensor, to read: one that keeps
        it or hands it to code fedcomp does not own keeps a copy (``vectors.clone``). Under
        ``network.codec: measured`` every client decodes, since its measured time is its
        simulated decode time."""
        if self.decode_each_broadcast:
            return codec.decompress(payload, *expect)
        last = self._last_shared
        if last is None or last[0] is not codec or last[1] != expect or last[2] != payload:
            last = self._last_shared = (codec, expect, payload, codec.decompress(payload, *expect))
        return last[3]

    @cached_property
    def training_flops(self) -> float:
        """Training FLOPs per sample of this model (counted once; the simulated compute)."""
        return training_flops_per_sample(self.model, self.train.input_shape, self.train.num_classes)

    @cached_property
    def algorithm(self) -> ClientAlgorithm:
        """The client algorithm (``client=...``): plain local SGD unless configured."""
        node = self.cfg.get("client")
        return build_target(node) if node is not None and node.get("_target_") else ClientAlgorithm()

    @cached_property
    def persistent_optimizer(self) -> bool:
        """``train.optimizer_state: persistent``: momentum buffers carried across rounds."""
        return self.cfg.train.optimizer_state == "persistent"

    @cached_property
    def decode_each_broadcast(self) -> bool:
        """``network.codec: measured``: every client decodes (see ``decode_shared``)."""
        return self.cfg.network.get("codec") == "measured"

    @cached_property
    def faults(self) -> bool:
        """``simulation.faults`` lists injected failures."""
        return bool(self.cfg.simulation.get("faults"))

    @cached_property
    def seal(self) -> Seal | None:
        """The run's payload seal (``simulation.integrity: hmac``), the same on every party."""
        sim = self.cfg.simulation
        return Seal.for_run(self.cfg.seed, sim.get("integrity_key")) if sim.get("integrity", "none") == "hmac" else None

    @cached_property
    def reduced_state(self) -> dict[str, torch.dtype]:
        """Client state groups kept in reduced precision (``simulation.ef_dtype``)."""
        return {M.UP_STATE: torch.bfloat16} if self.cfg.simulation.get("ef_dtype", "float32") == "bfloat16" else {}

    @cached_property
    def full_codec(self) -> Compressor:
        """fp32 codec for full-model (re)synchronisation under ``downlink: update``."""
        return build("identity")


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; ``auto`` picks CUDA when it is usable."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name} requested but torch sees no CUDA device (got {name!r})")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: only {torch.cuda.device_count()} CUDA device(s) (got {name!r})")
    return torch.device(name)


def _on(data: TensorData, device: torch.device) -> TensorData:
    return TensorData(data.x.to(device), data.y.to(device), data.num_classes)


def _warm_up(model: torch.nn.Module, data: TensorData) -> None:
    """One forward/backward pass, so one-off set-up (kernel selection, allocator) is not counted
    as the first client's compute time."""
    torch.nn.functional.cross_entropy(model(data.x[:2]), data.y[:2]).backward()
    model.zero_grad(set_to_none=True)


@lru_cache(maxsize=2)
def _runtime(cfg_yaml: str) -> Runtime:
    cfg = OmegaConf.create(cfg_yaml)
    device = resolve_device(cfg.train.device)
    train, test = load_dataset(cfg.dataset)
    partition = make_partition(cfg.partition, train.y.numpy(), train.num_classes, cfg.simulation.num_clients, cfg.seed)
    train, test = _on(train, device), _on(test, device)
    model = build_model(cfg.model, train.input_shape, train.num_classes, cfg.seed).to(device)
    _warm_up(model, train)
    return Runtime(cfg, train, test, partition, model, StateLayout.of(model))


_BY_ID: dict[int, tuple[DictConfig, Runtime]] = {}


def get_runtime(cfg: DictConfig) -> Runtime:
    """The runtime for ``cfg``. Configs are treated as immutable once composed; a lookup by
    identity first skips re-serialising the config on every client call."""
    hit = _BY_ID.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        if len(_BY_ID) > 16:
            _BY_ID.clear()
        hit = _BY_ID[id(cfg)] = (cfg, _runtime(OmegaConf.to_yaml(cfg, resolve=True)))
    return hit[1]
