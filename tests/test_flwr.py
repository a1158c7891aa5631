"""The apps under Flower's own runtimes: `fedcomp flwr` (local simulation) and the deployment
engine (a SuperLink and SuperNodes as separate processes)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcomp.config import compose_config
from fedcomp.fl.engine import run_inline
from fedcomp.flwr_cli import flwr_environment, main

ROOT = Path(__file__).parents[1]
OVERRIDES = "dataset=synthetic simulation.num_clients=2 num_rounds=2 progress=false compressor=topk train.optimizer_state=persistent train.momentum=0.5"


def test_fedcomp_flwr_sizes_the_federation_and_turns_runtime_installation_off(monkeypatch, tmp_path):
    seen = {}

    def fake_run(command, env, cwd):
        seen["command"], seen["env"], seen["cwd"] = command, env, cwd
        summary = tmp_path / "outputs" / "flwr" / "123" / "summary.json"  # what the ServerApp writes
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert main(["dataset=synthetic", "simulation.num_clients=5", 'name="a b"']) == 0
    assert seen["cwd"] == ROOT  # where Flower's local SuperLink, kept for later runs, starts
    command = seen["command"]
    assert command[command.index("--federation-config") + 1] == "num-supernodes=5"
    run_config = command[command.index("--run-config") + 1]
    assert run_config == f'overrides="dataset=synthetic simulation.num_clients=5 \'name=\\"a b\\"\'" output-dir="{tmp_path}/outputs/flwr"'
    assert seen["env"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert seen["env"]["PATH"].startswith(str(Path(sys.executable).parent))
    assert main(["simulation.num_clients=0"]) == 2  # checked before Flower starts


def test_fedcomp_flwr_fails_a_local_run_that_wrote_no_results(monkeypatch, tmp_path, capsys):
    """Flower's local simulation can end with status 0 and nothing written (a SuperLink left
    running in a deleted directory did): the command says so and fails."""
    monkeypatch.setattr(subprocess, "run", lambda command, env, cwd: subprocess.CompletedProcess(command, 0))
    monkeypatch.chdir(tmp_path)
    assert main(["dataset=synthetic", "simulation.num_clients=2"]) == 1
    assert "without writing results" in capsys.readouterr().err
    assert main(["dataset=synthetic", "--", "remote-federation"]) == 0  # a deployed federation writes on its own machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deployment_engine_gives_the_inline_run(tmp_path):
    """`flwr run` against a SuperLink with N SuperNodes, each its own process, --insecure on
    127.0.0.1: the same bytes and accuracy as the inline engine."""
    n, link = 2, free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**flwr_environment(), "FLWR_HOME": str(home)}
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([bin_dir / "flower-superlink", "--insecure", "--port", str(link), "--database", str(tmp_path / "link.db")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(4)
        for i in range(n):
            procs.append(subprocess.Popen([bin_dir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                                           str(free_port()), "--node-config", f"partition-id={i} num-partitions={n}"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "out"
        run = subprocess.run([bin_dir / "flwr", "run", str(ROOT), "test", "--stream", "--run-config",
                              f'overrides="{OVERRIDES}" output-dir="{out}"'], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        (summary_path,) = out.glob("*/summary.json")
    finally:
        for p in procs:
            p.kill()
    deployed = json.loads(summary_path.read_text())
    inline = run_inline(compose_config(OVERRIDES), tmp_path / "inline")
    for key in ("total_bytes_up", "total_bytes_down", "total_overhead_up", "sim_time_s"):
        assert deployed[key] == inline[key]
    assert deployed["final_accuracy"] == pytest.approx(inline["final_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_fedcomp_flwr_runs_the_local_simulation(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedcomp", "flwr", *OVERRIDES.split()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (summary_path,) = (tmp_path / "outputs" / "flwr").glob("*/summary.json")
    inline = run_inline(compose_config(OVERRIDES), tmp_path / "inline")
    assert json.loads(summary_path.read_text())["total_bytes_up"] == inline["total_bytes_up"]


def uv() -> list[str]:
    import shutil

    return [shutil.which("uv")] if shutil.which("uv") else ["python3", "-m", "uv"]


def test_the_wheel_carries_the_configs_and_runs(tmp_path):
    """`uv build` makes a wheel whose fedcomp runs on its own (configs and the codec table inside)."""
    import zipfile

    build = subprocess.run([*uv(), "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fedcomp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedcomp/conf/config.yaml" in names and "fedcomp/conf/compressor/topk.yaml" in names and "fedcomp/network/codec_times.json" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", "import fedcomp, sys; print(fedcomp.__file__); sys.argv[1:] = sys.argv[2:]; "
                           "from fedcomp.cli import main; main()", "--", "dataset=synthetic", "simulation.num_clients=2", "num_rounds=1",
                           "progress=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(tmp_path / "site")) and (tmp_path / "run" / "summary.json").is_file()
