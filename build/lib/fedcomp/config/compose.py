"""Compose the experiment config outside the Hydra CLI (``flwr run``, notebooks, tests)."""

from __future__ import annotations

import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fedcomp.config.schema import register_schema, validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # package data: a wheel carries the configs


def compose_config(overrides: list[str] | str = ()) -> DictConfig:
    """The config ``fedcomp <overrides>`` would run with, validated."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg)
    return cfg
