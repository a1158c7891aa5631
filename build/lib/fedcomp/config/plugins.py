"""Plug-ins from the user's own package.

Every plug-in point is a ``_target_`` in a config group entry (compressor, controller,
strategy, client algorithm, model, dataset), and ``plugins: [module, ...]`` imports modules
before the config is checked, for code that registers itself (``@register("name")`` for
compressors). The working directory is importable (``fedcomp`` puts it on ``sys.path``); a
config directory of the user's own joins the search path with Hydra's ``--config-dir DIR``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from fedcomp.config.schema import ConfigError


def importable_cwd() -> None:
    """Make the working directory's packages importable (as ``python -m`` would)."""
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_plugins(cfg: DictConfig) -> None:
    importable_cwd()
    for name in cfg.get("plugins") or ():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 -- a broken plug-in is a config error, named
            raise ConfigError(f"plugins: cannot import {name!r}: {type(exc).__name__}: {exc}") from None


def accepted(target, available: dict) -> dict:
    """The entries of ``available`` that ``target`` takes as keyword arguments (all of them
    when it takes ``**kwargs``)."""
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return available
    return {k: v for k, v in available.items() if k in params}


def build_target(node: DictConfig, **available):
    """``instantiate(node)`` passing only the ``available`` keyword arguments its target takes
    (the runner offers e.g. ``sizes`` to compressors; a plain class need not accept it)."""
    return instantiate(node, **accepted(get_object(node._target_), available))


def target_params(node: DictConfig) -> dict:
    """A ``_target_`` entry's own parameters (lists as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v
            for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in ("_target_", "name")}
