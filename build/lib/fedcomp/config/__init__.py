"""Typed configuration: the Hydra schema and the checks that run before any training."""

from fedcomp.config.compose import CONF_DIR, compose_config
from fedcomp.config.schema import ConfigError, register_schema, validate

__all__ = ["CONF_DIR", "ConfigError", "compose_config", "register_schema", "validate"]
