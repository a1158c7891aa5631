import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcomp.coding import encode_indices
from fedcomp.fl import messages as M
from fedcomp.fl.client_app import make_client_app
from fedcomp.fl.engine import InlineGrid
from fedcomp.fl.runtime import get_runtime
from fedcomp.fl.server_app import build_strategy
from fedcomp.hgc.codec import Entry, decode_uplink, encode_uplink, entry_mask, entry_values
from fedcomp.hgc.predictor import Predictor, xor_residue
from fedcomp.hgc.quantizer import dequantize_levels, quantize_levels
from fedcomp.hgc.schedule import lr_step_adjusted_ratio, warmup_ratio


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), bits=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_level_quantizer_eq3(n, bits, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    symbols, means = quantize_levels(x, bits)
    half = 1 << (bits - 1)
    assert symbols.shape == (n,) and means.shape == (2 * half,)
    for offset, sel in ((0, x < 0), (half, x >= 0)):
        s = symbols[sel.numpy()]
        assert np.all((s >= offset) & (s < offset + half))  # levels never mix signs
        counts = np.bincount(s - offset, minlength=half)
        if sel.any():
            assert counts.max() - counts.min() <= 1  # equal-count levels
    for level in np.unique(symbols):  # each level is the mean of its members
        assert means[level] == pytest.approx(float(x[torch.from_numpy(symbols == level)].mean()), rel=1e-5, abs=1e-6)
    order = np.argsort(x.numpy(), kind="stable")
    assert np.all(np.diff(symbols[order]) >= 0)  # symbol order follows value order


def test_one_bit_is_sign_with_per_sign_means():
    x = torch.tensor([-3.0, -1.0, 2.0, 4.0, 6.0])
    symbols, means = quantize_levels(x, 1)
    assert symbols.tolist() == [0, 0, 1, 1, 1] and means.tolist() == [-2.0, 4.0]
    assert dequantize_levels(symbols, means).tolist() == [-2.0, -2.0, 4.0, 4.0, 4.0]


def entropy(symbols):
    p = np.bincount(symbols) / len(symbols)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_xor_residue_round_trip_and_prediction_helps(bits, seed):
    g = torch.Generator().manual_seed(seed)
    pred = Predictor(beta=0.5)
    base = torch.randn(500, generator=g)
    for _ in range(3):
        pred.observe(base + 0.1 * torch.randn(500, generator=g))
    mask = torch.arange(0, 500, 2)
    x = (base + 0.1 * torch.randn(500, generator=g))[mask]
    symbols, _ = quantize_levels(x, bits)
    predicted = pred.predicted_symbols(mask, bits)
    residue = xor_residue(symbols, predicted)
    assert np.array_equal(xor_residue(residue, predicted), symbols)
    assert entropy(residue) < 0.8 * entropy(symbols)  # a correlated prediction lowers the entropy


def test_uplink_payload_decodes_to_exactly_what_the_client_computed():
    rng = torch.Generator().manual_seed(0)
    d, bits = 2000, 2
    client, server = Predictor(), Predictor()
    for _ in range(2):
        g = torch.randn(d, generator=rng)
        client.observe(g)
        server.observe(g)
    x = torch.randn(d, generator=rng)
    mask = torch.topk(x.abs(), 40).indices.sort().values
    symbols, levels = quantize_levels(x[mask], bits)
    sent = dequantize_levels(symbols, levels)
    residue = xor_residue(symbols, client.predicted_symbols(mask, bits))
    payload = encode_uplink(Entry(bits, levels, residue, True, encode_indices(mask.numpy(), d)), d, deflate=False)
    entry, numel = decode_uplink(payload)
    got_mask = entry_mask(entry, None, d)
    assert numel == d and torch.equal(got_mask, mask)
    assert torch.equal(entry_values(entry, got_mask, server), sent)


def test_momentum_changes_after_the_lr_step_window(fast_cfg):
    strategy, _ = run_hgc(fast_cfg, 2, "strategy.momentum=0.9", "strategy.momentum_after_lr_step=0.5",
                          "train.lr_milestones=[0.5]", "strategy.lr_step_window=1")
    step = strategy.lr_schedule.step_rounds[0]
    assert strategy.momentum_at(step) == 0.9 and strategy.momentum_at(step + 1) == 0.9
    assert strategy.momentum_at(step + 2) == 0.5


def test_resync_carries_model_predictor_and_velocity():
    from fedcomp.hgc.codec import decode_sync, encode_sync

    w = torch.randn(50)
    buffers = {"u": torch.randn(50, dtype=torch.float64), "velocity": torch.randn(50, dtype=torch.float64)}
    got_w, got = decode_sync(encode_sync(w, buffers))
    assert torch.equal(got_w, w) and torch.equal(got["u"], buffers["u"]) and torch.equal(got["velocity"], buffers["velocity"])
    assert not got["v"].any()
    assert len(encode_sync(w, buffers)) - len(encode_sync(w, {})) == 2 * 8 * 50  # two fp64 buffers


def test_warmup_and_lr_step_schedule():
    assert warmup_ratio(1, 0.001, 300) == 0.25
    assert warmup_ratio(301, 0.001, 300) == warmup_ratio(1000, 0.001, 300) == 0.001
    mid = warmup_ratio(151, 0.001, 300)
    assert mid == pytest.approx((0.25 * 0.001) ** 0.5)  # geometric midpoint
    values = [warmup_ratio(r, 0.001, 300) for r in range(1, 302)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert warmup_ratio(5, 0.01, 0) == 0.01
    assert lr_step_adjusted_ratio(48, 0.001, [50], 2, 10.0) == 0.01
    assert lr_step_adjusted_ratio(47, 0.001, [50], 2, 10.0) == 0.001


def run_hgc(fast_cfg, rounds, *extra):
    cfg = fast_cfg("strategy=hgc", "strategy.ratio=0.02", f"num_rounds={rounds}", *extra)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    rt = get_runtime(cfg)
    grid = InlineGrid(make_client_app(cfg), cfg.simulation.num_clients)
    strategy = build_strategy(cfg, rt)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(rt.new_model().state_dict()), num_rounds=rounds)
    return strategy, grid


def client_buffers(ctx):
    return {k: ctx.state[M.HGC_STATE][k].numpy() for k in ("u", "v")}


@pytest.mark.parametrize("extra", [(), ("strategy.momentum=0.9", "strategy.momentum_after_lr_step=0.5", "train.lr_milestones=[0.5]")])
def test_predictor_buffers_and_models_identical_on_both_ends(fast_cfg, extra):
    strategy, grid = run_hgc(fast_cfg, 12, "strategy.bits=2", *extra)
    server_u, server_v = strategy.predictor.u.numpy(), strategy.predictor.v.numpy()
    # Clients hold the state before the last relay; one more relay brings them level.
    from fedcomp.fl.hgc_client import synchronise

    for ctx in grid._contexts.values():
        pred = Predictor(strategy.beta, strategy.eps)
        pred.load_state({k: torch.from_numpy(v) for k, v in client_buffers(ctx).items()})
        rec = {M.KIND: M.DELTA, M.PAYLOAD: strategy._pending, M.VERSION: strategy._version,
               "server-lr": strategy.server_lr, "relay-momentum": strategy._relay_momentum}
        w, velocity = synchronise(rec, ctx.state, pred)
        assert np.array_equal(pred.u.numpy(), server_u) and np.array_equal(pred.v.numpy(), server_v)
        assert torch.equal(w, strategy._global) and torch.equal(velocity, strategy.velocity)
    assert np.abs(server_u).sum() > 0


def test_mask_cost_is_counted_once_up_and_relayed_down(fast_cfg):
    strategy, _ = run_hgc(fast_cfg, 3)
    for r in (2, 3):
        clients = sorted(strategy.rounds[r].clients, key=lambda c: -c.bytes_up)
        owner, members = clients[0], clients[1:]
        mask_bytes = len(strategy._mask_blob)
        assert mask_bytes > 0
        assert all(owner.bytes_up - m.bytes_up >= mask_bytes for m in members)
        assert all(m.bytes_down - owner.bytes_down == mask_bytes for m in members)


def test_own_masks_cost_more_uplink_and_prediction_changes_size(fast_cfg):
    shared, _ = run_hgc(fast_cfg, 4)
    own, _ = run_hgc(fast_cfg, 4, "strategy.mask_policy=own")
    up = lambda s: sum(s.rounds[r].bytes_up for r in s.rounds)
    assert up(own) > up(shared)


def test_rotating_owner_changes_and_largest_owner_is_biggest(fast_cfg):
    strategy, _ = run_hgc(fast_cfg, 4)
    strategy_largest, _ = run_hgc(fast_cfg, 4, "strategy.mask_policy=largest")
    owners = []
    for s in (strategy, strategy_largest):
        per_round = []
        for r in range(2, 5):
            per_round.append(max(s.rounds[r].clients, key=lambda c: c.bytes_up))
        owners.append(per_round)
    assert len({c.partition_id for c in owners[0]}) > 1
    biggest = max(c.num_examples for c in strategy_largest.rounds[2].clients)
    assert all(c.num_examples == biggest for c in owners[1][1:])


def test_hgc_learns_with_partial_participation(fast_cfg, tmp_path):
    from fedcomp.fl.engine import run_inline

    summary = run_inline(fast_cfg("strategy=hgc", "strategy.ratio=0.05", "num_rounds=6", "simulation.fraction=0.5", "train.steps=5"), tmp_path)
    assert summary["final_accuracy"] > summary["initial_accuracy"]
