"""``fedcomp flwr [overrides...]``: run the experiment under ``flwr run .`` as it should be run.

Flower's local simulation needs three things the bare command leaves to the user: as many
SuperNodes as ``simulation.num_clients`` (``--federation-config num-supernodes=N``; Flower's
default federation has 2), no installation of the app's dependencies at run time (the
environment is already set up: ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), and this
environment's ``flower-superlink`` on ``PATH``. This command composes and checks the config
first, then runs ``flwr run . --stream`` with all three; the run writes to
``outputs/flwr/<Flower run id>``. Arguments after ``--`` go to ``flwr run`` (e.g. a SuperLink
connection name for a deployed federation).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
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
    return subprocess.run(command, env=flwr_environment()).returncode
