"""The researcher's workflow: checkpoints and resume, sweeps that survive bad cells, logs."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fedcomp.fl.engine import run_inline


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"} for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [
    ["compressor=topk_bidirectional", "train.optimizer_state=persistent", "train.momentum=0.5", "controller=accordion",
     "controller.low=0.05", "controller.high=0.2", "controller.interval=1", "simulation.fraction=0.5"],
    ["strategy=hgc", "strategy.ratio=0.05", "strategy.bits=2", "client=scaffold", "train.optimizer_state=persistent",
     "train.momentum=0.5"],
])
def test_six_rounds_straight_equal_three_stop_resume_three(fast_cfg, tmp_path, extra):
    straight = run_inline(fast_cfg("num_rounds=6", *extra), tmp_path / "straight")
    stopped = run_inline(fast_cfg("num_rounds=6", "simulation.stop_after_round=3", *extra), tmp_path / "resumed")
    assert stopped["status"] == "stopped" and stopped["rounds"] == 3
    resumed = run_inline(fast_cfg("num_rounds=6", *extra), tmp_path / "resumed", resume=True)
    assert resumed["status"] == "ok" and resumed["resumed_from"] == 3
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    for key in ("final_accuracy", "total_bytes_up", "total_bytes_down", "sim_time_s", "total_cr"):
        assert resumed[key] == straight[key]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert all((a[k] == b[k]).all() for k in a)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedcomp", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


SMALL = ["dataset=synthetic", "model=mlp", "model.hidden=[16]", "simulation.num_clients=3", "train.steps=2", "progress=false"]


def test_cli_resume_continues_a_stopped_run(tmp_path):
    run = tmp_path / "run"
    first = cli(*SMALL, "num_rounds=4", "simulation.stop_after_round=2", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped"
    again = cli("resume", str(run))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rounds"] == 4 and len(rows(run)) == 4
    log = (run / "cli.log").read_text()
    assert "round 1:" in log and "round 2:" in log


def test_sweep_records_a_bad_cell_goes_on_and_exits_non_zero(tmp_path):
    proc = cli("-m", *SMALL, "num_rounds=1", "partition.alpha=0,0.5", "train.lr=500,0.05", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1
    statuses = {}
    for path in tmp_path.glob("*/summary.json"):
        s = json.loads(path.read_text())
        statuses[(s["config"]["partition"]["alpha"], s["config"]["train"]["lr"])] = s["status"]
    assert statuses[(0, 500)] == statuses[(0, 0.05)] == "failed"  # alpha=0 is refused, the sweep goes on
    assert statuses[(0.5, 0.05)] == "ok" and statuses[(0.5, 500)] in ("diverged", "ok")
    assert "did not finish" in proc.stderr
    again = cli("-m", *SMALL, "num_rounds=1", "partition.alpha=0,0.5", "train.lr=500,0.05", "resume=true", f"hydra.sweep.dir={tmp_path}")
    assert again.stdout.count("skipped:") == sum(status == "ok" for status in statuses.values())  # finished cells are not rerun
    assert again.returncode == 1  # the failed ones ran again, and failed again


def test_a_diverged_run_stops_cleanly_with_its_metrics(fast_cfg, tmp_path):
    summary = run_inline(fast_cfg("num_rounds=5", "train.lr=1e6", "train.steps=10"), tmp_path)
    assert summary["status"] == "diverged" and summary["rounds"] < 5
    assert len(rows(tmp_path)) == summary["rounds"] and (tmp_path / "model.safetensors").is_file()


def test_joblib_launcher_runs_cells_in_parallel(tmp_path):
    proc = cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL, "num_rounds=1", "seed=0,1",
               f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("*/summary.json"))) == 2


def test_report_tables_and_plots_runs_and_lists_the_unfinished(fast_cfg, tmp_path):
    from fedcomp.report import main as report

    for compressor in ("none", "topk", "qsgd"):
        run_inline(fast_cfg("num_rounds=2", f"compressor={compressor}"), tmp_path / "runs" / compressor)
    run_inline(fast_cfg("num_rounds=4", "simulation.stop_after_round=1"), tmp_path / "runs" / "stopped")
    assert report([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--target", "0.2", "--html"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# 3 runs (1 not finished)") and "stopped: simulation.stop_after_round=1" in md
    lines = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 4 and "compressor.up.name" in header and "MB_up_to_0.2" in header
    by_name = {line.split(",")[header.index("compressor.up.name")]: line.split(",") for line in lines[1:]}
    up = header.index("MB_up")
    assert float(by_name["topk"][up]) < float(by_name["qsgd"][up]) < float(by_name["identity"][up])
    assert (tmp_path / "rep" / "report.png").stat().st_size > 10_000 and (tmp_path / "rep" / "report.html").stat().st_size > 10_000
