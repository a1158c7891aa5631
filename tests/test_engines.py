"""Engines (how clients are run) give the same answers: pool workers bit-identical to inline."""

import json
import os
import signal

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedcomp.fl.engine import run_experiment
from fedcomp.fl.pool import PoolGrid, assign, client_work
from fedcomp.fl.runtime import get_runtime

STATEFUL = ("compressor=topk_bidirectional", "num_rounds=3", "train.optimizer_state=persistent", "train.momentum=0.9",
            "simulation.fraction=0.75", "simulation.client_cpus=1")


def rows(out_dir):
    """Per-round metrics without the host's wall clock."""
    out = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("wall_time_s")
        for client in row["clients"].values():
            client.pop("compute_s", None)
        out.append(row)
    return out


def same_run(a, b) -> None:
    assert rows(a) == rows(b)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("extra", [
    STATEFUL,
    ("strategy=hgc", "strategy.ratio=0.05", "strategy.bits=2", "num_rounds=3", "simulation.fraction=0.75", "simulation.client_cpus=1"),
], ids=["topk-ef-momentum", "hgc"])
def test_pool_is_bit_identical_to_inline_for_any_worker_count(fast_cfg, tmp_path, extra):
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    for workers in (1, 3):
        run_experiment(fast_cfg(*extra, "simulation.backend=pool", f"simulation.workers={workers}"), tmp_path / f"pool{workers}")
        same_run(tmp_path / "inline", tmp_path / f"pool{workers}")


def test_assignment_balances_client_work():
    work = [60, 10, 30, 30, 20, 50]
    owner = assign(work, 3)
    loads = [sum(w for w, o in zip(work, owner) if o == k) for k in range(3)]
    assert sorted(loads) == [60, 70, 70]  # LPT: 60+10 | 50+20 | 30+30
    assert assign([5.0], 4) == [0]


def test_pool_checkpoint_resumes_bit_for_bit(fast_cfg, tmp_path):
    pool = ("simulation.backend=pool", "simulation.workers=2", "num_rounds=4")
    run_experiment(fast_cfg(*STATEFUL, *pool), tmp_path / "straight")
    assert run_experiment(fast_cfg(*STATEFUL, *pool, "simulation.stop_after_round=2"), tmp_path / "resumed")["status"] == "stopped"
    assert run_experiment(fast_cfg(*STATEFUL, *pool), tmp_path / "resumed", resume=True)["status"] == "ok"
    same_run(tmp_path / "straight", tmp_path / "resumed")


def test_a_dead_worker_costs_its_clients_their_replies_not_the_run(fast_cfg):
    from fedcomp.fl import messages as M

    cfg = fast_cfg("simulation.backend=pool", "simulation.workers=2")
    grid = PoolGrid(cfg, client_work(cfg, get_runtime(cfg).partition.sizes))
    try:
        nodes = sorted(grid.get_node_ids())
        os.kill(grid._procs[0].pid, signal.SIGKILL)
        grid._procs[0].wait()
        queries = [Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=n, message_type="query") for n in nodes]
        replies = grid.send_and_receive(queries)
        assert len(replies) == len(nodes)
        errors = [r for r in replies if r.has_error()]
        assert 0 < len(errors) < len(nodes)  # one worker's clients, not all
        assert all("died" in r.error.reason for r in errors)
    finally:
        grid.close()


def test_pool_shape_from_workers_and_client_cpus(fast_cfg, monkeypatch):
    from fedcomp.fl import pool

    monkeypatch.setattr(pool, "available_cores", lambda: 16)
    assert pool.pool_shape(fast_cfg().simulation) == (16, 1)
    assert pool.pool_shape(fast_cfg("simulation.client_cpus=4").simulation) == (4, 4)
    assert pool.pool_shape(fast_cfg("simulation.workers=3", "simulation.client_cpus=2").simulation) == (3, 2)
