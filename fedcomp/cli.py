"""``fedcomp`` / ``python -m fedcomp``: the Hydra entry point."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedcomp.config import CONF_DIR, ConfigError, register_schema, validate
from fedcomp.config.plugins import importable_cwd

log = logging.getLogger("fedcomp")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
    except ConfigError as exc:
        print(f"fedcomp: invalid config: {exc}", file=sys.stderr)
        sys.exit(2)
    from fedcomp.data import DatasetMissingError
    from fedcomp.fl.engine import run_experiment  # heavy imports only after the config is valid
    from fedcomp.network import TraceError

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run_experiment(cfg, out_dir)
    except (DatasetMissingError, TraceError) as exc:
        print(f"fedcomp: {exc}", file=sys.stderr)
        sys.exit(2)
    print(
        f"final accuracy {summary['final_accuracy']:.4f} | up {summary['total_bytes_up']:,} B | "
        f"down {summary['total_bytes_down']:,} B | sim {summary['sim_time_s']:.2f} s | results in {out_dir}"
    )
    return summary["final_accuracy"]


def main() -> None:
    importable_cwd()
    register_schema()
    _main()
