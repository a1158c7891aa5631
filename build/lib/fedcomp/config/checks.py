"""Cross-checks of a config that need more than one group, run before any data is loaded.

The dataset's size and input shape are known from its spec; the model is built and run on a
zero input of that shape; the compressors are built for the model's layout; the strategy
checks its own parameters; the ratio controller must have a ratio to control. Every failure is
a one-line ``ConfigError`` naming the key.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from fedcomp.config.plugins import build_target
from fedcomp.config.schema import ConfigError

SPARSIFIER_HINT = "a sparsifying uplink compressor (topk, randomk, stochastic, sq, stc, dgc)"


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"{key}: {why}".split("\n")[0])


def cross_check(cfg: DictConfig) -> None:
    from fedcomp.data import dataset_spec
    from fedcomp.models import StateLayout, build_model

    spec = dataset_spec(cfg.dataset)
    n = cfg.simulation.num_clients
    _check_device(cfg.train.device)
    if spec is None:  # a plug-in dataset without a spec: what needs its shape waits for the data
        return
    per_client = cfg.partition.get("shards_per_client", cfg.partition.get("min_samples", 1))
    if spec.num_train < n * per_client:
        raise _fail("simulation.num_clients", f"{n} clients x {per_client} sample(s) or shard(s) each exceed the "
                    f"{spec.num_train} training samples of dataset {cfg.dataset.name}")
    if cfg.partition.name == "explicit" and len(cfg.partition.fractions) != n:
        raise _fail("partition.fractions", f"has {len(cfg.partition.fractions)} entries for simulation.num_clients={n}")
    if cfg.model.get("name") == "resnet18" and spec.input_shape[0] != 3:
        raise _fail("model.name", f"resnet18 is the CIFAR-style ResNet (3-channel images); dataset {cfg.dataset.name} "
                    f"gives {spec.input_shape}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # a model too deep for the input warns before it fails
            model = build_model(cfg.model, spec.input_shape, spec.num_classes, cfg.seed)
            model.eval()(torch.zeros(1, *spec.input_shape))
    except (ValueError, RuntimeError) as exc:
        raise _fail("model", f"{cfg.model.get('name') or cfg.model._target_} cannot take dataset {cfg.dataset.name}'s input {spec.input_shape}: {exc}") from None
    sizes = StateLayout.of(model).sizes
    compressors = {}
    for direction in ("up", "down"):
        try:
            compressors[direction] = build_target(cfg.compressor[direction], sizes=sizes)
        except Exception as exc:  # noqa: BLE001 -- any failure to build is the config's
            raise _fail(f"compressor.{direction}", str(getattr(exc, "__cause__", None) or exc)) from None
    from fedcomp.fl.strategy import CompressedFedAvg

    strategy = get_class(cfg.strategy._target_)
    if not (isinstance(strategy, type) and issubclass(strategy, CompressedFedAvg)):
        raise _fail("strategy._target_", f"{cfg.strategy._target_} is not a fedcomp strategy: subclass "
                    "fedcomp.fl.strategy.CompressedFedAvg (Flower's own strategies exchange ArrayRecords, not coded payloads)")
    params = {k: v for k, v in OmegaConf.to_container(cfg.strategy, resolve=True).items() if k != "_target_"}
    check = getattr(strategy, "check_params", None)
    if check is not None:
        check(params, cfg, sizes)
    else:
        check_signature(strategy, params)
    _check_controller(cfg, compressors["up"])


def check_signature(strategy: type, params: dict) -> None:
    """Refuse ``strategy.*`` keys the class's constructor does not take."""
    accepted = inspect.signature(strategy).parameters
    if any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        return
    for key in params:
        if key not in accepted:
            raise _fail(f"strategy.{key}", f"unknown option; {strategy.__name__} takes {sorted(accepted)}")


def _check_controller(cfg: DictConfig, up) -> None:
    if not cfg.controller.get("_target_"):
        return
    n = cfg.simulation.num_clients
    if "per_client" in cfg.controller and len(cfg.controller.per_client) != n:
        raise _fail("controller.per_client", f"has {len(cfg.controller.per_client)} ratios for simulation.num_clients={n}")
    try:
        instantiate(cfg.controller)
    except Exception as exc:  # noqa: BLE001
        raise _fail("controller", str(exc)) from None
    if cfg.strategy._target_.endswith("HGCStrategy"):
        return  # HGC applies the mean ratio to its shared mask itself
    try:
        up.set_ratio(0.01)
    except ValueError:
        raise _fail("controller", f"{cfg.controller._target_.rsplit('.', 1)[-1]} sets ratios and needs {SPARSIFIER_HINT}; "
                    f"compressor.up.name={cfg.compressor.up.name} has none") from None


def _check_device(name: str) -> None:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise _fail("train.device", f"{name} requested but torch sees no CUDA device")
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise _fail("train.device", f"only {torch.cuda.device_count()} CUDA device(s), asked for {name}")
