"""``fedcomp flwr [overrides...]``: run the experiment under ``flwr run .`` as it should be run.

Flower's local simulation needs three things the bare command leaves to the user: as many
SuperNodes as ``simulation.num_clients`` (``--federation-config num-supernodes=N``; Flower's
default federation has 2), no installation of the app's dependencies at run time (the
environment is already set up: ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), and this
environment's ``flower-superlink`` on ``PATH``. This command composes and checks the config
first, then runs ``flwr run . --stream`` with all three; the run writes to
``outputs/flwr/<Flower run id>``, and a local run that ends without writing there fails the
command. Arguments after ``--`` go to ``flwr run`` (e.g. a SuperLink connection name for a
deployed federation).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RUNTIME_INSTALL_OFF = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def flwr_environment() -> dict[str, str]:
    """This environment's executables first on PATH, run-time installation off."""
    return {**os.environ, **RUNTIME_INSTALL_OFF, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str]) -> int:
    from fedcomp.config import ConfigError, compose_config

    overrides, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    app = Path(__file__).resolve().parents[1]
    if not (app / "pyproject.toml").is_file():
        print("fedcomp flwr: needs the fedcomp source tree (a Flower app is a directory with pyproject.toml)", file=sys.stderr)
        return 2
    try:
        cfg = compose_config(overrides)
    except ConfigError as exc:
        print(f"fedcomp: invalid config: {exc}", file=sys.stderr)
        return 2
    out = Path.cwd() / "outputs" / "flwr"
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(app), *extra, "--stream",
               "--run-config", f"overrides={toml_string(shlex.join(overrides))} output-dir={toml_string(str(out))}",
               "--federation-config", f"num-supernodes={cfg.simulation.num_clients}"]
    # Run from the app's directory: Flower starts its local SuperLink in the caller's directory
    # and keeps it for later runs, whose simulations then die silently once that directory is
    # gone (a run from a since-deleted temporary directory broke every later one).
    started = time.time()
    code = subprocess.run(command, env=flwr_environment(), cwd=app).returncode
    if code == 0 and not extra and not wrote_results(out, started):
        print(f"fedcomp flwr: the run ended without writing results under {out}; Flower's local SuperLink logs to "
              "~/.flwr/local-superlink/superlink.log", file=sys.stderr)
        return 1
    return code


def wrote_results(out: Path, since: float) -> bool:
    """Whether a run's summary appeared under ``out`` (one folder per Flower run id) since ``since``."""
    return any(path.stat().st_mtime >= since for path in out.glob("*/summary.json"))
