"""``fedcomp`` / ``python -m fedcomp``: the Hydra entry point, plus two subcommands.

    fedcomp [overrides] [-m sweep overrides]   run (or sweep) experiments
    fedcomp resume RUN_DIR [overrides]         continue an interrupted run from its checkpoint
    fedcomp report DIR... [--out DIR] [--html] one table and plots over finished runs
    fedcomp flwr [overrides] [-- flwr args]    the same run under Flower's `flwr run .`

Every run ends with a ``summary.json`` whose ``status`` is ``ok``, ``diverged`` (stopped
cleanly, metrics kept) or ``failed`` (with the reason). In a sweep a failed cell is recorded
and the sweep goes on; the sweep exits non-zero at the end if any cell failed
(``SweepStatus``). ``resume=true`` skips cells whose directory already holds a finished run.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fedcomp.config import CONF_DIR, ConfigError, register_schema, validate
from fedcomp.config.plugins import importable_cwd

log = logging.getLogger("fedcomp")


def finished(out_dir: Path) -> bool:
    path = out_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("status", "ok") == "ok"


def _fail(out_dir: str, cfg: DictConfig, status: str, reason: str, exit_code: int) -> None:
    from fedcomp.metrics.recorder import write_failure

    write_failure(out_dir, cfg, status, reason)
    print(f"fedcomp: {reason}" if status == "failed" else f"fedcomp: {status}: {reason}", file=sys.stderr)
    if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep goes on; SweepStatus sets its exit code
        sys.exit(exit_code)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    out_dir = HydraConfig.get().runtime.output_dir
    if cfg.get("resume") and finished(Path(out_dir)):
        print(f"skipped: {out_dir} already holds a finished run (resume=true)")
        return None
    try:
        validate(cfg)
    except ConfigError as exc:
        return _fail(out_dir, cfg, "failed", f"invalid config: {exc}", 2)
    from fedcomp.data import DatasetMissingError
    from fedcomp.fl.engine import run_experiment  # heavy imports only after the config is valid
    from fedcomp.network import TraceError

    try:
        summary = run_experiment(cfg, out_dir)
    except (DatasetMissingError, TraceError) as exc:
        return _fail(out_dir, cfg, "failed", str(exc), 2)
    except Exception as exc:  # noqa: BLE001 -- recorded with its traceback in the run's log
        log.exception("run failed")
        return _fail(out_dir, cfg, "failed", f"{type(exc).__name__}: {exc}", 1)
    status = summary.get("status", "ok")
    acc = summary["final_accuracy"]
    print(
        f"{'' if status == 'ok' else status + ' (' + summary.get('reason', '') + '): '}final accuracy "
        f"{'-' if acc is None else f'{acc:.4f}'} | up {summary['total_bytes_up']:,} B | down {summary['total_bytes_down']:,} B | "
        f"sim {summary['sim_time_s']:.2f} s | results in {out_dir}"
    )
    return acc


class SweepStatus(Callback):
    """At the end of a sweep: list the cells that did not finish and exit non-zero if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        bad = []
        for path in sorted(root.glob("**/summary.json")):
            summary = json.loads(path.read_text())
            if summary.get("status", "ok") != "ok":
                bad.append(f"{path.parent.name}: {summary['status']}: {summary.get('reason', '')}")
        if bad:
            print(f"fedcomp: {len(bad)} sweep cell(s) did not finish:\n  " + "\n  ".join(bad), file=sys.stderr)
            sys.exit(1)


def main() -> None:
    importable_cwd()
    if len(sys.argv) > 1 and sys.argv[1] in ("resume", "report", "flwr"):
        command, args = sys.argv[1], sys.argv[2:]
        if command == "report":
            from fedcomp.report import main as report

            sys.exit(report(args))
        if command == "flwr":
            from fedcomp.flwr_cli import main as flwr

            sys.exit(flwr(args))
        from fedcomp.fl.checkpoint import resume

        sys.exit(resume(args))
    register_schema()
    _main()
