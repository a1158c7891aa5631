"""Local training recipes: optimizer state across rounds, the momentum ramp, resets (HGC Sec. 3.2)."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from omegaconf import OmegaConf

from fedcomp.compression import build
from fedcomp.fl import messages as M
from fedcomp.fl.client_round import apply_resets
from fedcomp.fl.client_state import ResidentContext, client_state
from fedcomp.fl.engine import run_inline
from fedcomp.fl.local import LocalSGD, train_local
from fedcomp.fl.schedule import TrainSchedule


def small_problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3), x, y


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-3)])
def test_local_sgd_is_torch_sgd_bit_for_bit(momentum, weight_decay):
    """The hand-written step (which spares every process the torch._dynamo import) equals
    torch.optim.SGD exactly, over several steps and a frozen parameter without a gradient."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ours = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        model[2].bias.requires_grad_(False)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    opt = LocalSGD(list(ours.parameters()), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        for model, o in ((ref, torch_opt), (ours, opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            o.step()
        for p, q in zip(ref.parameters(), ours.parameters()):
            assert torch.equal(p, q)


def test_persistent_buffers_continue_the_same_sgd_as_one_long_run():
    """Four one-step calls with carried momentum buffers are the same SGD as one four-step
    call: PyTorch's first-step initialisation (buf = grad) equals a zero buffer."""
    args = dict(epochs=1, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3)
    model, x, y = small_problem()
    one_run = [p.detach().clone() for p in model.parameters()]
    idx = torch.arange(64)
    long = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p, q in zip(long.parameters(), one_run):
            p.copy_(q)
    train_local(long, x, y, idx, steps=4, generator=torch.Generator().manual_seed(1), **args)
    buffers: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(64, generator=gen)  # the long run's batches, one per call
    for step in range(4):
        batch = perm[16 * step : 16 * (step + 1)]
        train_local(model, x, y, batch, steps=1, generator=torch.Generator().manual_seed(9), momentum_buffers=buffers, **args)
    assert set(buffers) == {"weight", "bias"}
    for p, q in zip(model.parameters(), long.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_momentum_ramp_and_lr_steps():
    train = OmegaConf.create({"lr": 0.1, "lr_milestones": [0.5], "lr_gamma": 0.1, "momentum": 0.0,
                              "momentum_ramp": [[300, 0.6], [100, 0.3], [600, 0.9]]})
    s = TrainSchedule.from_config(train, 1000)
    assert [s.momentum_at(r) for r in (1, 99, 100, 299, 300, 599, 600, 1000)] == [0, 0, 0.3, 0.3, 0.6, 0.6, 0.9, 0.9]
    assert s.lr(500) == 0.1 and s.lr(501) == pytest.approx(0.01)


@pytest.mark.parametrize("resident", [False, True])
def test_reset_clears_error_feedback_and_momentum_once(resident):
    context = (ResidentContext if resident else Context)(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    state = client_state(context)
    for name in (M.UP_STATE, M.OPT_STATE, M.REPLICA):
        state.put(name, {"w": torch.ones(3)})
    apply_resets(state, ConfigRecord({M.RESETS: 0}))
    assert state.get(M.UP_STATE) and state.get(M.OPT_STATE)
    apply_resets(state, ConfigRecord({M.RESETS: 1}))
    assert state.get(M.UP_STATE) is None and state.get(M.OPT_STATE) is None and state.get(M.REPLICA)
    state.put(M.OPT_STATE, {"w": torch.ones(3)})
    apply_resets(state, ConfigRecord({M.RESETS: 1}))  # already applied
    assert state.get(M.OPT_STATE)
    assert (M.OPT_STATE in context.state) != resident  # ArrayRecords only where the Context is serialised


def test_persistent_momentum_is_kept_per_client_and_changes_the_run(fast_cfg, tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    from fedcomp.fl.client_app import make_client_app
    from fedcomp.fl.engine import InlineGrid
    from fedcomp.fl.server_app import run_server

    ramp = "train.momentum_ramp=[[2,0.9]]"
    fresh = run_inline(fast_cfg("num_rounds=3", ramp), tmp_path / "fresh")
    cfg = fast_cfg("num_rounds=3", ramp, "train.optimizer_state=persistent")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    grid = InlineGrid(make_client_app(cfg), cfg.simulation.num_clients)
    kept = run_server(grid, cfg, tmp_path / "kept")
    buffers = [client_state(ctx).get(M.OPT_STATE) for ctx in grid._contexts.values()]
    assert len(buffers) == 4 and all(set(b) == {"1.weight", "1.bias", "3.weight", "3.bias"} for b in buffers)
    assert not torch.equal(buffers[0]["1.bias"], buffers[1]["1.bias"])
    assert kept["final_accuracy"] != fresh["final_accuracy"] or kept["rounds"] != fresh["rounds"]
    # Momentum 0 throughout: nothing to carry, the same run as fresh.
    zero_fresh = run_inline(fast_cfg(), tmp_path / "zf")
    zero_kept = run_inline(fast_cfg("train.optimizer_state=persistent"), tmp_path / "zk")
    assert zero_kept["final_accuracy"] == zero_fresh["final_accuracy"]


def test_dgc_takes_the_schedules_momentum_and_the_optimizer_runs_without():
    dgc = build("dgc", momentum=None, ratio=0.5)
    assert dgc.take_momentum(0.6) and dgc.selector.momentum == 0.6
    fixed = build("dgc", ratio=0.5)
    assert not fixed.take_momentum(0.6) and fixed.selector.momentum == 0.9
    assert not build("topk", ratio=0.5, error_feedback=True).take_momentum(0.6)
    assert build("dgc", momentum=None, ratio=0.5, error_feedback=True).take_momentum(0.3)


def test_hgc_reset_after_the_lr_step_window_reaches_every_client(fast_cfg, tmp_path):
    """Sec. 3.2: the round after the window around the LR step orders a reset and the new local
    momentum; every client applies the reset once (clients record it in their Context)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedcomp.fl.client_app import make_client_app
    from fedcomp.fl.engine import InlineGrid
    from fedcomp.fl.server_app import run_server

    class ConfigTap(InlineGrid):
        configs: list = []

        def push_messages(self, messages):
            messages = list(messages)
            self.configs += [dict(m.content[M.CONFIG]) for m in messages if M.CONFIG in m.content]
            return super().push_messages(messages)

    cfg = fast_cfg("strategy=hgc", "strategy.ratio=0.05", "num_rounds=6", "train.lr_milestones=[0.5]", "strategy.lr_step_window=1",
                   "train.optimizer_state=persistent", "train.momentum=0.5", "strategy.momentum_after_lr_step=0.9")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    grid = ConfigTap(make_client_app(cfg), cfg.simulation.num_clients)
    summary = run_server(grid, cfg, tmp_path)
    by_round = {c[M.ROUND]: c for c in grid.configs}
    # LR step at round 4; window rounds 3..5; reset and new momentum from round 6.
    assert [by_round[r].get(M.RESETS, 0) for r in range(1, 7)] == [0, 0, 0, 0, 0, 1]
    assert [by_round[r][M.MOMENTUM] for r in range(1, 7)] == [0.5] * 5 + [0.9]
    assert all(client_state(ctx).number(M.RESETS_SEEN) == 1 for ctx in grid._contexts.values())
    assert summary["final_accuracy"] > summary["initial_accuracy"]
