"""Engines (how clients are run) give the same answers: pool workers bit-identical to inline."""

import json
import os
import signal

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedcomp.fl.engine import run_experiment
from fedcomp.fl.pool import PoolGrid, assign, client_work, rebalance
from fedcomp.fl.runtime import get_runtime

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HGC_ONE_THREAD = ("strategy=hgc", "strategy.ratio=0.05", "strategy.bits=2", "num_rounds=3", "simulation.fraction=0.75",
                  "simulation.client_cpus=1")
# A client that raises instead of training, a lost upload and a corrupted one (rounds 2-3).
FAULTS = ("simulation.faults=[{kind: crash, clients: [0], rounds: [2]}, {kind: lose, clients: [1], rounds: [2]},"
          " {kind: corrupt, clients: [2], rounds: [2, 3]}]")
STATEFUL = ("compressor=topk_bidirectional", "num_rounds=3", "train.optimizer_state=persistent", "train.momentum=0.9",
            "simulation.fraction=0.75", "simulation.client_cpus=1")
# Equal shards (500 samples each): the batched engine trains a round's clients as one cohort
# (one group per shard size; a group of one trains in the sequential loop).
EQUAL_SHARDS = "partition=iid"
# 3 steps of batch 4: the 144 -> 64 layer's factors (12 rows) are a third of its weight: the batched engine keeps them (LowRankWeights)
LOW_RANK = ("model.hidden=[64]", "train.batch_size=4")


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
    HGC_ONE_THREAD,
], ids=["topk-ef-momentum", "hgc"])
def test_pool_is_bit_identical_to_inline_for_any_worker_count(fast_cfg, tmp_path, extra):
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    for workers in (1, 3):
        run_experiment(fast_cfg(*extra, "simulation.backend=pool", f"simulation.workers={workers}"), tmp_path / f"pool{workers}")
        same_run(tmp_path / "inline", tmp_path / f"pool{workers}")


def test_pool_carries_failed_clients_replies_as_inline_does(fast_cfg, tmp_path):
    """A client's exception comes back as an error reply (no content), a lost or corrupted
    upload as inline reports it: the same rows and model on both engines (at one thread each:
    a float32 sum's rounding depends on how many threads share it)."""
    extra = ("compressor=topk_bidirectional", "num_rounds=3", "simulation.integrity=hmac", "simulation.client_cpus=1", FAULTS)
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    run_experiment(fast_cfg(*extra, "simulation.backend=pool", "simulation.workers=2"), tmp_path / "pool")
    same_run(tmp_path / "inline", tmp_path / "pool")
    assert any("client crash" in f["reason"] for f in rows(tmp_path / "pool")[1]["failed"])


def test_assignment_balances_client_work():
    work = [60, 10, 30, 30, 20, 50]
    owner = assign(work, 3)
    loads = [sum(w for w, o in zip(work, owner) if o == k) for k in range(3)]
    assert sorted(loads) == [60, 70, 70]  # LPT: 60+10 | 50+20 | 30+30
    assert assign([5.0], 4) == [0]


def test_rebalance_evens_a_rounds_work_with_the_clients_it_may_move():
    owner = dict.fromkeys(range(10), 0) | {10: 1}
    work = dict.fromkeys(range(11), 60.0)
    moves = rebalance(range(11), owner, work, live=[0, 1, 2], movable=range(11))
    loads = [sum(work[n] for n in range(11) if moves.get(n, owner[n]) == w) for w in range(3)]
    assert sorted(loads) == [180, 240, 240]  # 11 equal clients on 3 workers: 4 | 4 | 3
    assert all(owner[n] == 0 for n in moves)  # only the loaded worker gives clients away
    assert rebalance(range(11), owner, work, live=[0, 1, 2], movable=range(11)) == moves  # deterministic
    assert set(rebalance(range(11), owner, work, live=[0, 1, 2], movable=[1, 2, 3])) == {1, 2, 3}  # clients with state stay
    assert rebalance(range(11), owner, work, live=[1, 2], movable=range(11)) == {}  # worker 0 is dead: its clients stay
    assert rebalance([0, 10], owner, work, live=[0, 1], movable=[0, 10]) == {}  # already even
    # a move happens only while it shortens the round: one 100-sample client cannot be split
    assert rebalance([0, 10], owner, {0: 100.0, 10: 10.0}, live=[0, 1], movable=[0, 10]) == {}


@pytest.mark.parametrize("extra", [
    ("compressor=topk_bidirectional", "train.optimizer_state=persistent", "train.momentum=0.9"),
    ("strategy=hgc", "strategy.ratio=0.05", "strategy.bits=2"),
    ("compressor=none",),
], ids=["topk-ef-momentum", "hgc", "fedavg"])
def test_rebalancing_moves_only_clients_without_state_and_changes_nothing(fast_cfg, tmp_path, monkeypatch, extra):
    """Every client starts on worker 0, so every round moves part of the cohort to worker 1:
    clients that have not trained yet (FedAvg: every client, it keeps no state). The run is
    still the inline run."""
    from fedcomp.fl import pool

    trained, moved = set(), []

    def recorded(nodes, *rest, movable):
        moves = rebalance(nodes, *rest, movable=movable)
        moved.append((set(moves), set(moves) & trained))
        trained.update(nodes)
        return moves

    monkeypatch.setattr(pool, "assign", lambda work, workers: [0] * len(work))
    monkeypatch.setattr(pool, "rebalance", recorded)
    extra = (*extra, "simulation.num_clients=10", "simulation.fraction=0.8", "num_rounds=5", "simulation.client_cpus=1")
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    run_experiment(fast_cfg(*extra, "simulation.backend=pool", "simulation.workers=2"), tmp_path / "pool")
    same_run(tmp_path / "inline", tmp_path / "pool")
    assert sum(len(m) for m, _ in moved) >= 3
    retrained_moves = sum(len(again) for _, again in moved)
    assert retrained_moves > 0 if extra[0] == "compressor=none" else retrained_moves == 0


@pytest.mark.parametrize("backend", ["pool", "batched_pool"])
def test_pool_checkpoint_resumes_bit_for_bit(fast_cfg, tmp_path, backend):
    pool = (f"simulation.backend={backend}", "simulation.workers=2", "num_rounds=4")
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


def test_state_store_spills_beyond_its_budget_and_reads_back_exactly(tmp_path):
    from fedcomp.fl.state_store import StateStore

    store = StateStore(budget_bytes=3 * 4000, spill_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(1000, generator=g)
    kept = {}
    for owner in range(10):
        kept[owner] = torch.randn(1000, generator=g)
        store.put(owner, "ef", {"residual": kept[owner], "w": shared})
        assert store.resident_bytes <= store.budget
    assert store.spilled_bytes > 0 and any(tmp_path.iterdir())
    for owner in range(10):
        group = store.get(owner, "ef")
        assert torch.equal(group["residual"], kept[owner]) and torch.equal(group["w"], shared)
    store.put(3, "ef", {})
    assert store.get(3, "ef") is None and store.names(3) == []
    store.close()
    assert not any(tmp_path.iterdir())


def test_a_shared_tensor_is_held_and_counted_once():
    from fedcomp.fl.state_store import StateStore

    store = StateStore()
    w = torch.zeros(1000)
    for owner in range(5):
        store.put(owner, "replica", {"w": w})
    assert store.resident_bytes == 4000
    assert all(store.get(o, "replica")["w"].data_ptr() == w.data_ptr() for o in range(5))


@pytest.mark.parametrize("extra", [STATEFUL, ("strategy=hgc", "strategy.ratio=0.05", "num_rounds=3", "train.optimizer_state=persistent",
                                              "train.momentum=0.5", "simulation.fraction=0.75")], ids=["topk", "hgc"])
def test_a_memory_budget_spills_client_state_without_changing_the_run(fast_cfg, tmp_path, extra):
    from fedcomp.fl import engine

    spilled = []
    original = engine.state_store

    def tracked(sim, share=1):
        store = original(sim, share)
        spilled.append(store)
        return store

    engine.state_store = tracked
    try:
        run_experiment(fast_cfg(*extra, "simulation.state_memory_gb=0.00001"), tmp_path / "budget")
    finally:
        engine.state_store = original
    run_experiment(fast_cfg(*extra), tmp_path / "unbounded")
    same_run(tmp_path / "budget", tmp_path / "unbounded")
    assert spilled and spilled[0].spilled_bytes > 0


def test_bfloat16_error_feedback_is_kept_in_half_the_bytes_on_every_engine(fast_cfg, tmp_path):
    from fedcomp.fl import messages as M
    from fedcomp.fl.client_app import make_client_app
    from fedcomp.fl.client_state import client_state
    from fedcomp.fl.engine import InlineGrid, declare_server_task
    from fedcomp.fl.server_app import run_server

    cfg = fast_cfg(*STATEFUL, "simulation.ef_dtype=bfloat16")
    declare_server_task(1)
    grids = {resident: InlineGrid(make_client_app(cfg), cfg.simulation.num_clients, resident=resident) for resident in (True, False)}
    for resident, grid in grids.items():
        run_server(grid, cfg, tmp_path / str(resident))
    same_run(tmp_path / "True", tmp_path / "False")
    resident_ef = [client_state(c)._get(M.UP_STATE) for c in grids[True]._contexts.values()]
    assert any(g and g["residual"].dtype == torch.bfloat16 for g in resident_ef)
    record_ef = [client_state(c, {M.UP_STATE: torch.bfloat16}).get(M.UP_STATE) for c in grids[False]._contexts.values()]
    assert any(g and g["residual"].dtype == torch.float32 for g in record_ef)  # read back as float32
    run_experiment(fast_cfg(*STATEFUL), tmp_path / "fp32")
    assert rows(tmp_path / "fp32") != rows(tmp_path / "True")  # a real trade-off: the residual is rounded


def test_back_to_back_runs_in_one_process_do_not_share_server_state(fast_cfg, tmp_path):
    """The server's compressors (downlink error feedback) belong to one run, even when two runs
    of one config share the process's cached runtime."""
    for name in ("a", "b"):
        run_experiment(fast_cfg(*STATEFUL), tmp_path / name)
    same_run(tmp_path / "a", tmp_path / "b")


def close_runs(a, b, tol=1e-5) -> None:
    """Same bytes every round; accuracy and losses equal up to float summation order."""
    for ra, rb in zip(rows(a), rows(b), strict=True):
        assert (ra["bytes_up"], ra["bytes_down"], ra["sim_time_s"]) == (rb["bytes_up"], rb["bytes_down"], rb["sim_time_s"])
        assert ra.get("accuracy") == pytest.approx(rb.get("accuracy"), abs=2e-3)
        for ca, cb in zip(ra["clients"].values(), rb["clients"].values(), strict=True):
            assert ca["train_loss"] == pytest.approx(cb["train_loss"], rel=tol)


@pytest.mark.parametrize("extra", [
    (*STATEFUL, "train.weight_decay=0.001"),
    (*STATEFUL, "model=cnn4", "model.channels=[4,8]", "model.hidden=16", "train.epochs=1", "train.steps=null", "train.batch_size=64"),
    ("strategy=hgc", "strategy.ratio=0.05", "strategy.bits=2", "num_rounds=3", "simulation.fraction=0.75"),
    ("client=fedprox", "num_rounds=2"),
    (*LOW_RANK, "compressor=topk", "compressor.up.ratio=0.1", "compressor.up.error_feedback=true", "train.momentum=0.9"),
], ids=["topk-ef-momentum-wd", "cnn4-epoch", "hgc", "fedprox-sequential", "low-rank-topk-ef"])
def test_batched_matches_inline(fast_cfg, tmp_path, extra):
    """The cohort trained as one vmapped computation: same bytes, same answers to float tolerance."""
    extra = (*extra, EQUAL_SHARDS)
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    run_experiment(fast_cfg(*extra, "simulation.backend=batched"), tmp_path / "batched")
    close_runs(tmp_path / "inline", tmp_path / "batched")


@pytest.mark.parametrize("extra", [
    STATEFUL,
    ("strategy=hgc", "strategy.ratio=0.05", "strategy.bits=2", "num_rounds=3", "simulation.fraction=0.75"),
], ids=["topk-ef-momentum", "hgc"])
def test_batched_pool_matches_inline(fast_cfg, tmp_path, extra):
    """Pool workers each training their share of the cohort as one vmapped computation: the
    inline engine's bytes, its answers to float tolerance."""
    extra = (*extra, EQUAL_SHARDS)
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    run_experiment(fast_cfg(*extra, "simulation.backend=batched_pool", "simulation.workers=2"), tmp_path / "batched_pool")
    close_runs(tmp_path / "inline", tmp_path / "batched_pool")


def test_batched_pool_workers_train_their_clients_as_one_cohort(fast_cfg, tmp_path):
    """With measured compute time, a cohort's clients share its training time equally: the two
    workers' equal-sized clients show at most two distinct times a round, where clients trained
    one by one each show their own."""
    measured = ("partition=iid", "network.compute=measured", "simulation.workers=2")
    run_experiment(fast_cfg(*measured, "simulation.backend=pool"), tmp_path / "pool")
    run_experiment(fast_cfg(*measured, "simulation.backend=batched_pool"), tmp_path / "batched_pool")
    def distinct_times(run: str) -> list[int]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [len({c["compute_s"] for c in json.loads(line)["clients"].values()}) for line in lines]

    assert distinct_times("pool") == [4, 4]
    assert distinct_times("batched_pool") == [2, 2]


def test_batched_pool_refuses_a_model_with_batch_norm_before_starting_workers(tmp_path, monkeypatch):
    from fedcomp.config import compose_config
    from fedcomp.fl import pool

    monkeypatch.setattr(pool, "PoolGrid", lambda *a, **k: pytest.fail("workers started"))
    cfg = compose_config(["dataset=synthetic", "dataset.synthetic.shape=[3,8,8]", "model=resnet18", "model.norm=batch",
                          "simulation.num_clients=2", "num_rounds=1", "progress=false", "simulation.backend=batched_pool"])
    with pytest.raises(ValueError, match="batch norm"):
        run_experiment(cfg, tmp_path)


@cuda
@pytest.mark.parametrize("extra", [
    STATEFUL,
    HGC_ONE_THREAD,
], ids=["topk-ef-momentum", "hgc"])
def test_engines_agree_on_cuda(fast_cfg, tmp_path, extra):
    """train.device=cuda: two pool workers sharing the device give the inline run bit for bit;
    the batched cohort gives its bytes, and its answers to float tolerance."""
    on_gpu = (*extra, EQUAL_SHARDS, "train.device=cuda")
    run_experiment(fast_cfg(*on_gpu), tmp_path / "inline")
    run_experiment(fast_cfg(*on_gpu, "simulation.backend=pool", "simulation.workers=2"), tmp_path / "pool")
    same_run(tmp_path / "inline", tmp_path / "pool")
    run_experiment(fast_cfg(*on_gpu, "simulation.backend=batched"), tmp_path / "batched")
    close_runs(tmp_path / "inline", tmp_path / "batched")


def test_cohort_training_returns_detached_updates(fast_cfg):
    """The updates carry no autograd history into compression and the wire."""
    from fedcomp.fl.batched import train_cohort
    from fedcomp.fl.cohort import TrainingRequest
    from fedcomp.fl.runtime import get_runtime

    rt = get_runtime(fast_cfg())
    w, shard = rt.layout.flatten(rt.new_model()), rt.client_indices(0)  # one shard: one group
    requests = [TrainingRequest(w, shard, c, rt.local_training, None) for c in range(2)]
    train_cohort(rt, requests)
    assert all(r.update is not None and not r.update.requires_grad for r in requests)


def test_each_client_of_a_cohort_gets_an_update_of_its_own(fast_cfg):
    """Not a view of one cohort-sized block: a client that keeps its update pins its own memory
    only, so the next cohort's updates reuse the freed memory instead of faulting in new pages."""
    from fedcomp.fl.batched import train_cohort
    from fedcomp.fl.cohort import TrainingRequest

    rt = get_runtime(fast_cfg())
    w, shard = rt.layout.flatten(rt.new_model()), rt.client_indices(0)  # one shard: one group
    requests = [TrainingRequest(w, shard, c, rt.local_training, None) for c in range(3)]
    train_cohort(rt, requests)
    assert all(r.update._base is None and r.update.is_contiguous() for r in requests)
    assert len({r.update.untyped_storage().data_ptr() for r in requests}) == 3


@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear-steps", "general-step"])
def test_cohort_training_equals_the_sequential_loop_with_carried_momentum(fast_cfg, monkeypatch, fused):
    """Carried momentum buffers, in both of the cohort's steps: the Linear layers stepped inside
    the backward pass (fedcomp.fl.fused_sgd), or every parameter from its gradient, re-laid out
    to its gradient's layout (a vmapped Linear's weight gradient comes transposed; the first
    cohort finds it, the second stacks in it). Both give the loop's parameters and momentum
    buffers, the buffers handed back in the standard layout."""
    import torch

    from fedcomp.fl import batched
    from fedcomp.fl.batched import train_cohort
    from fedcomp.fl.cohort import TrainingRequest
    from fedcomp.fl.local import train_local
    from fedcomp.fl.runtime import get_runtime

    if not fused:
        monkeypatch.setattr(batched, "fused_plan", lambda model: None)
    rt = get_runtime(fast_cfg("train.momentum=0.9", "train.weight_decay=0.001"))
    w, shard = rt.layout.flatten(rt.new_model()), rt.client_indices(0)  # one shard: one group
    training = rt.local_training
    held = {name: torch.randn_like(p) for name, p in rt.model.named_parameters()}
    for _ in range(2):
        requests = [TrainingRequest(w, shard, c, training, {n: b.clone() for n, b in held.items()}) for c in range(3)]
        train_cohort(rt, requests)
    for c, request in enumerate(requests):
        buffers = {n: b.clone() for n, b in held.items()}
        rt.layout.load(rt.model, w)
        train_local(rt.model, rt.train.x, rt.train.y, shard, generator=torch.Generator().manual_seed(c),
                    momentum_buffers=buffers, **training)
        torch.testing.assert_close(request.update, rt.layout.flatten(rt.model) - w, rtol=1e-5, atol=1e-6)
        for name, buf in buffers.items():
            assert request.buffers[name].is_contiguous()
            torch.testing.assert_close(request.buffers[name], buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [
    (),
    ("train.weight_decay=0.01",),
    ("model=cnn4", "model.channels=[4,8]", "model.hidden=16", "train.weight_decay=0.01"),
    ("train.momentum=0.9",),
    ("model=cnn4", "model.channels=[4,8]", "model.hidden=16", "train.momentum=0.9", "train.weight_decay=0.01"),
], ids=["mlp", "mlp-wd", "cnn4-wd", "mlp-momentum", "cnn4-momentum-wd"])
def test_cohort_training_with_fused_linear_steps_equals_the_sequential_loop(fast_cfg, extra):
    """The Linear layers are stepped inside the backward pass (fedcomp.fl.fused_sgd), the
    convolutions from their gradients, momentum fresh each round; every client ends where the
    loop's training does."""
    from fedcomp.fl.fused_sgd import fused_plan

    rt = get_runtime(fast_cfg(*extra))
    linear = {f"{prefix}.{n}" for prefix, m in rt.model.named_modules() if type(m) is torch.nn.Linear for n, _ in m.named_parameters()}
    assert fused_plan(rt.model).stepped == linear
    _cohort_equals_the_loop(rt)


def _cohort_equals_the_loop(rt, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Three clients of one shard (one group) trained by ``train_cohort`` end where the loop's
    training of each does, their losses and updates' squared norms alongside. The start is on
    the CPU, as a received model is; the updates are on the training device."""
    from fedcomp.fl.batched import train_cohort
    from fedcomp.fl.cohort import TrainingRequest
    from fedcomp.fl.local import train_local

    w, shard = rt.layout.flatten(rt.new_model()).cpu(), rt.client_indices(0)
    requests = [TrainingRequest(w, shard, c, rt.local_training, None) for c in range(3)]
    train_cohort(rt, requests)
    for c, request in enumerate(requests):
        assert request.update.device == rt.device
        rt.layout.load(rt.model, w)
        loss = train_local(rt.model, rt.train.x, rt.train.y, shard, generator=torch.Generator().manual_seed(c), **rt.local_training)
        torch.testing.assert_close(request.update.cpu(), rt.layout.flatten(rt.model).cpu() - w, rtol=rtol, atol=atol)
        assert request.loss == pytest.approx(loss, rel=max(rtol / 10, 1e-6))
        assert request.update_sq_norm == float(torch.dot(request.update, request.update))


@cuda
@pytest.mark.parametrize("extra", [
    ("train.momentum=0.9", "train.weight_decay=0.01"),
    (*LOW_RANK, "train.weight_decay=0.01"),
    ("model=cnn4", "model.channels=[4,8]", "model.hidden=16", "train.momentum=0.9", "train.weight_decay=0.01"),
    (*LOW_RANK, "model=cnn4", "model.channels=[4,8]", "model.hidden=64"),
], ids=["mlp-fused", "mlp-low-rank", "cnn4-grouped", "cnn4-grouped-low-rank"])
def test_cohort_training_equals_the_sequential_loop_on_cuda(fast_cfg, monkeypatch, extra):
    """The cohort's fused steps, low-rank weights and grouped convolutions on a GPU (NCHW there,
    channels-last only on the CPU). TF32 is off for both sides: with it cuDNN's grouped and
    per-client convolutions round differently, beyond what this compares."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _cohort_equals_the_loop(get_runtime(fast_cfg(*extra, "train.device=cuda")), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [
    (),
    ("train.weight_decay=0.01",),
    ("train.momentum=0.9", "train.weight_decay=0.01"),
    ("model=cnn4", "model.channels=[4,8]", "model.hidden=64", "train.momentum=0.9"),
], ids=["mlp", "mlp-wd", "mlp-momentum-wd", "cnn4-momentum"])
def test_cohort_training_with_low_rank_weights_equals_the_sequential_loop(fast_cfg, extra):
    """Clients sharing the round's broadcast keep a Linear weight as the shared start and the
    factors of their steps (fedcomp.fl.fused_sgd.LowRankWeights) where those are smaller than the
    weight; the rest of the model is stepped as before. Every client ends where the loop's
    training does, with the update's squared norm alongside."""
    from fedcomp.fl.fused_sgd import fused_plan

    rt = get_runtime(fast_cfg(*LOW_RANK, *extra))
    training = rt.local_training
    plan = fused_plan(rt.model)
    low = plan.low_rank_weights(training["steps"] * training["batch_size"])
    assert low and len(low) < len(plan.linear_shapes)  # one layer kept as factors, the last one stepped
    _cohort_equals_the_loop(rt)


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.0, 0.01), (0.9, 0.0), (0.9, 0.01)])
def test_low_rank_weights_step_each_client_as_sgd_does(momentum, weight_decay):
    """Three steps of 5, 5 and 3 rows (an epoch's last batch is short) through a plan whose first
    Linear weight is kept as factors: each client's written update equals three SGD steps of the
    client alone (autograd's gradients, LocalSGD's arithmetic) from the shared start."""
    from torch import nn

    from fedcomp.fl.fused_sgd import SGD, LowRankWeights, cohort_losses, fused_plan
    from fedcomp.fl.local import LocalSGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 3))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    clients, lr = 4, 0.1
    batches = [(torch.randn(clients, rows, 40), torch.randint(0, 3, (clients, rows))) for rows in (5, 5, 3)]
    plan, sgd = fused_plan(model), SGD(lr, momentum, weight_decay)
    assert plan.low_rank_weights(13) == ["0.weight"]
    params = {n: v.expand(clients, *v.shape).clone() for n, v in start.items() if n != "0.weight"}
    low_rank = LowRankWeights({"0.weight": start["0.weight"]}, clients, 13, sgd)
    with torch.no_grad():
        for x, y in batches:
            with torch.enable_grad():
                torch.autograd.grad(cohort_losses(plan.logits(params, x, sgd, low_rank), y).sum(), [plan.anchor], allow_unused=True)
            low_rank.advance(x.shape[1])
    for i in range(clients):
        model.load_state_dict(start)
        opt = LocalSGD(list(model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        update = torch.empty(24, 40)
        low_rank.write_update("0.weight", i, update)
        torch.testing.assert_close(update, model[0].weight.detach() - start["0.weight"], rtol=1e-5, atol=1e-6)
        for name in params:
            torch.testing.assert_close(params[name][i], dict(model.named_parameters())[name].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("extra", "parts"), [
    (("model=cnn4", "model.channels=[4,8]", "model.hidden=16"), 1),
    (LOW_RANK, 2),
], ids=["stacked", "low-rank-and-stacked"])
def test_a_cohort_of_clients_starting_from_different_models_trains_each_from_its_own(fast_cfg, extra, parts):
    """Clients of one cohort holding different models (HGC's stale replicas): each is stacked
    from its own vector, not from the round's shared broadcast. Where a Linear weight can be
    kept as factors, the clients sharing a start train apart from the other one, which, alone,
    trains in the sequential loop (bit for bit)."""
    from fedcomp.fl.batched import _by_start, train_cohort
    from fedcomp.fl.cohort import TrainingRequest
    from fedcomp.fl.fused_sgd import fused_plan
    from fedcomp.fl.local import train_local

    rt = get_runtime(fast_cfg(*extra))
    w = rt.layout.flatten(rt.new_model())
    starts = [w, w + 0.01 * torch.randn_like(w), w]  # two clients share a vector, one does not
    shard = rt.client_indices(0)  # one shard size: one group
    requests = [TrainingRequest(start, shard, c, rt.local_training, None) for c, start in enumerate(starts)]
    assert [[r.seed for r in part] for part in _by_start(fused_plan(rt.model), requests)] == ([[0, 1, 2]] if parts == 1 else [[0, 2], [1]])
    train_cohort(rt, requests)
    for c, (start, request) in enumerate(zip(starts, requests)):
        rt.layout.load(rt.model, start)
        train_local(rt.model, rt.train.x, rt.train.y, shard, generator=torch.Generator().manual_seed(c), **rt.local_training)
        torch.testing.assert_close(request.update, rt.layout.flatten(rt.model) - start, rtol=1e-5, atol=1e-6)
        if parts == 2 and c == 1:
            assert torch.equal(request.update, rt.layout.flatten(rt.model) - start)


def _plan_steps_each_client_as_sgd_does(model, x: torch.Tensor, y: torch.Tensor, momentum: float, stepped: set[str]) -> None:
    """Three steps of ``model``'s fused plan (its ``stepped`` parameters stepped in the backward,
    the rest from autograd's gradients) from random per-client parameters equal three SGD steps
    of each client alone (autograd's gradients, LocalSGD's arithmetic)."""
    from torch import nn

    from fedcomp.fl.fused_sgd import SGD, cohort_losses, fused_plan
    from fedcomp.fl.local import LocalSGD

    clients = [[torch.randn_like(p) for p in model.parameters()] for _ in range(len(x))]
    lr, weight_decay = 0.1, 0.01
    names = [n for n, _ in model.named_parameters()]
    params = {n: torch.stack([c[i] for c in clients]) for i, n in enumerate(names)}
    plan, sgd = fused_plan(model), SGD(lr, momentum, weight_decay)
    assert plan.stepped == stepped
    rest = [n for n in names if n not in plan.stepped]
    for name in rest:
        params[name].requires_grad_()
    with torch.no_grad():
        for _ in range(3):
            with torch.enable_grad():
                losses = cohort_losses(plan.logits(params, x, sgd), y)
                grads = torch.autograd.grad(losses.sum(), [params[n] for n in rest] + [plan.anchor], allow_unused=True)
            for name, grad in zip(rest, grads):
                sgd.step_(name, params[name], grad)
    for i, values in enumerate(clients):
        with torch.no_grad():
            for p, v in zip(model.parameters(), values):
                p.copy_(v)
        opt = LocalSGD(list(model.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name][i].detach(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_fused_plan_steps_each_client_as_sgd_does(momentum):
    """Any Sequential: nested, a Linear on 3-d per-client inputs, one without bias, elementwise
    and vmapped layers between."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True)), nn.LayerNorm(6), nn.Flatten(), nn.Linear(18, 6, bias=False),
                          nn.GELU(), nn.Linear(6, 3))
    _plan_steps_each_client_as_sgd_does(model, torch.randn(3, 5, 3, 4), torch.randint(0, 3, (3, 5)), momentum,
                                        {"0.0.weight", "0.0.bias", "3.weight", "5.weight", "5.bias"})


def test_a_fused_plan_runs_convolutions_grouped_and_steps_each_client_as_sgd_does():
    """Convolutions (with and without bias, strided, padded, grouped) as one grouped convolution of all
    clients, the activations kept channel-grouped through ReLU, max-pools (run before the ReLU
    they follow) and an adaptive pool, back to clients-first for the Linear layer; a pool
    before any convolution runs on the clients-first activations."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                          nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    _plan_steps_each_client_as_sgd_does(model, torch.randn(3, 5, 2, 16, 16), torch.randint(0, 3, (3, 5)), 0.9, {"9.weight", "9.bias"})


@pytest.mark.parametrize("channels", [1, 3])
def test_channel_grouped_activations_are_channels_last_on_the_cpu(channels):
    """What makes the grouped convolutions and the max-pools after them run channels-last."""
    from fedcomp.fl.fused_sgd import _grouped

    h = torch.randn(4, 5, channels, 6, 7)  # clients, rows, channels, H, W
    grouped = _grouped(h)
    assert grouped.t.shape == (5, 4 * channels, 6, 7)
    assert grouped.t.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grouped.client_first(), h)
    out = torch.nn.functional.conv2d(grouped.t, torch.randn(4 * 2, channels, 3, 3), None, 1, 1, 1, 4)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_a_max_pool_after_a_relu_runs_first_with_the_same_values_and_gradients():
    from torch import nn

    from fedcomp.fl.fused_sgd import _pool_before_relu

    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    assert _pool_before_relu([relu, pool, nn.Flatten()])[:2] == [pool, relu]
    x = torch.randn(4, 3, 8, 8).clamp_(max=0.5).requires_grad_()  # windows of ties at 0 and at 0.5, and wholly negative ones
    as_defined, swapped = pool(relu(x)), relu(pool(x))
    assert torch.equal(as_defined, swapped)
    g = torch.randn_like(as_defined)
    assert torch.equal(*(torch.autograd.grad(out, x, g)[0] for out in (as_defined, swapped)))


def test_fused_steps_apply_only_where_each_layer_runs_once_in_sequence():
    from torch import nn

    from fedcomp.fl.fused_sgd import fused_plan

    shared = nn.Linear(4, 4)
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Linear(3, 2, bias=False))
    assert fused_plan(nested).stepped == {"1.0.weight", "1.0.bias", "2.weight"}
    assert fused_plan(nn.Sequential(shared, nn.ReLU(), shared)) is None
    assert fused_plan(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())) is None
    assert fused_plan(nn.ModuleList([nn.Linear(4, 4)])) is None

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    assert fused_plan(Residual(nn.Linear(4, 4))) is None
    assert fused_plan(nn.Sequential(Residual(nn.Linear(4, 4)), nn.Linear(4, 2))).stepped == {"1.weight", "1.bias"}


def test_batched_client_rounds_take_turns_on_the_engines_thread(fast_cfg, tmp_path, monkeypatch):
    """Every client round runs on the thread that runs the engine (in greenlets), so PyTorch's
    OpenMP pool stays one team, as on the inline engine."""
    import threading

    import fedcomp.fl.batched as batched

    threads = set()
    original = batched.call_client_app
    monkeypatch.setattr(batched, "call_client_app", lambda *a: threads.add(threading.get_ident()) or original(*a))
    run_experiment(fast_cfg("simulation.backend=batched"), tmp_path)
    assert threads == {threading.get_ident()}


def test_batched_carries_failed_clients_replies_as_inline_does(fast_cfg, tmp_path):
    """A client that raises before it trains, a lost and a corrupted upload, while the others'
    rounds wait for the cohort: the same failures, bytes and answers as inline."""
    extra = ("compressor=topk_bidirectional", "num_rounds=3", "simulation.integrity=hmac", FAULTS, EQUAL_SHARDS)
    run_experiment(fast_cfg(*extra), tmp_path / "inline")
    run_experiment(fast_cfg(*extra, "simulation.backend=batched"), tmp_path / "batched")
    close_runs(tmp_path / "inline", tmp_path / "batched")
    failed = [row["failed"] for row in rows(tmp_path / "batched")]
    assert failed == [row["failed"] for row in rows(tmp_path / "inline")]
    assert any("client crash" in f["reason"] for f in failed[1])


def test_batched_refuses_models_it_cannot_train_alike():
    from torch import nn

    from fedcomp.fl.batched import check_model

    with pytest.raises(ValueError, match="batch norm"):
        check_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match="dropout"):
        check_model(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
    check_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))


def test_cohort_training_failure_costs_the_round_not_the_run(fast_cfg, tmp_path, monkeypatch):
    import fedcomp.fl.batched as batched

    def broken(rt, requests):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batched, "train_cohort", broken)
    summary = run_experiment(fast_cfg("simulation.backend=batched"), tmp_path / "run")
    assert summary["status"] == "ok"
    assert all(r["failed"] and all("cohort training failed" in f["reason"] for f in r["failed"]) for r in rows(tmp_path / "run"))


def test_pool_sends_a_value_shared_by_several_messages_once():
    from fedcomp.fl.engine import declare_server_task
    from fedcomp.fl.pool import _COUNT, _REF, _deserialise_batch, _serialise_batch

    declare_server_task(1)
    big, own = bytes(range(256)) * 1024, b"\x07" * 100_000
    batch = [Message(RecordDict({"down": ConfigRecord({"payload": big, "n": i}), "mine": ConfigRecord({"p": own if i == 0 else b"small"})}),
                     dst_node_id=2 + i, message_type="train") for i in range(3)]
    mimic = _REF + _COUNT.pack(0)  # a client's bytes that look like a reference stay its own
    batch[2].content["mine"]["p"] = mimic
    blobs = _serialise_batch(batch)
    assert sum(len(b) for b in blobs) < len(big) + len(own) + 10_000  # big once, not three times
    assert big in blobs and own in blobs  # large values beside the protobuf, not inside it
    assert batch[1].content["down"]["payload"] is big  # the server's messages are left as they were
    rebuilt = _deserialise_batch(blobs)
    assert [(m.content["down"]["payload"], m.content["down"]["n"], m.content["mine"]["p"]) for m in rebuilt] == \
        [(big, 0, own), (big, 1, b"small"), (big, 2, mimic)]


@pytest.mark.parametrize("extra", [(), ("compressor=topk_bidirectional", "simulation.fraction=0.75")], ids=["model", "delta"])
def test_a_broadcast_is_decoded_once_per_process_and_changes_nothing(fast_cfg, tmp_path, monkeypatch, extra):
    """Every client of a round gets the same downlink bytes: the process decodes them once and
    hands every client that vector to read; the run is the one where every client decodes."""
    from fedcomp.compression.base import Compressor
    from fedcomp.fl.runtime import Runtime

    cfg = fast_cfg("num_rounds=3", *extra)
    calls = []
    original = Runtime.decode_shared

    def counted(self, codec, payload, expect):
        before = self._last_shared
        out = original(self, codec, payload, expect)
        calls.append(self._last_shared is not before)
        return out

    monkeypatch.setattr(Runtime, "decode_shared", counted)
    run_experiment(cfg, tmp_path / "shared")
    assert calls.count(True) < len(calls)  # clients after the first reused the round's decode

    def every_client_decodes(self, codec: Compressor, payload, expect):
        return codec.decompress(payload, *expect)

    monkeypatch.setattr(Runtime, "decode_shared", every_client_decodes)
    run_experiment(cfg, tmp_path / "each")
    same_run(tmp_path / "shared", tmp_path / "each")


def test_rounds_read_the_shared_broadcast_and_hooks_get_a_copy(fast_cfg, tmp_path, monkeypatch):
    """Clients load and subtract the round's one decoded model in place and never write it; a
    client algorithm's gradient hook, anybody's code, gets a copy of its own to change."""
    from fedcomp.fl.algorithms import ClientAlgorithm
    from fedcomp.fl.runtime import Runtime

    seen = []

    class Vandal(ClientAlgorithm):
        def grad_hook(self, model, layout, w_global, state, extras):
            rt = get_runtime(cfg)
            seen.append(w_global is rt._last_shared[3])
            w_global.add_(1.0)
            return None

    cfg = fast_cfg("num_rounds=2")
    run_experiment(cfg, tmp_path / "plain")
    rt = get_runtime(cfg)
    codec, expect, payload, decoded = rt._last_shared
    assert torch.equal(decoded, codec.decompress(payload, *expect))  # the last round's clients left it as decoded
    monkeypatch.setattr(Runtime, "algorithm", property(lambda self: Vandal()))
    run_experiment(cfg, tmp_path / "vandal")
    assert seen and not any(seen)
    same_run(tmp_path / "plain", tmp_path / "vandal")
