"""Client algorithms: FedProx's proximal term and SCAFFOLD's control variates (counted bytes)."""

import json

import pytest
import torch

from fedcomp.fl import messages as M
from fedcomp.fl.algorithms import FedProx, Scaffold, per_parameter
from fedcomp.fl.client_state import ResidentContext, client_state
from fedcomp.fl.engine import run_inline
from fedcomp.models import StateLayout


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2))


def test_parameters_are_read_out_of_the_layout_around_buffers():
    model = small_model()
    layout = StateLayout.of(model)
    flat = layout.flatten(model)
    assert [torch.equal(a, p) for a, p in zip(per_parameter(flat, model, layout), model.parameters())] == [True] * 6
    assert layout.numel > sum(p.numel() for p in model.parameters())  # batch-norm statistics in between


def test_fedprox_adds_mu_times_the_distance_to_the_global_model():
    model = small_model()
    layout = StateLayout.of(model)
    w0 = layout.flatten(model).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    FedProx(mu=0.5).grad_hook(model, layout, w0, None, {})(model)
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_scaffold_control_variates_follow_option_two():
    context = ResidentContext(run_id=1, node_id=2, node_config={}, state=__import__("flwr").app.RecordDict(), run_config={})
    state = client_state(context)
    algo, server = Scaffold(), Scaffold()
    c = server.server_extras(4)["control"]
    update = torch.tensor([1.0, -2.0, 0.0, 4.0])
    delta = algo.client_extras(update, state, {"control": c}, steps=2, lr=0.5)["control"]
    assert torch.equal(delta, -update / (2 * 0.5))  # c_i+ = c_i - c - update / (K lr), from zeros
    assert torch.equal(state.tensor(M.ALGO_STATE, "c_i"), delta)
    server.server_update([{"control": delta}, {"control": 3 * delta}], num_clients=4)
    assert torch.equal(server.c, 2 / 4 * 2 * delta)  # c + |S|/N mean(dc_i)


@pytest.mark.parametrize("strategy", [[], ["strategy=hgc", "strategy.ratio=0.05"]])
def test_scaffold_traffic_is_counted_both_ways(fast_cfg, tmp_path, strategy):
    plain = run_inline(fast_cfg(*strategy), tmp_path / "plain")
    scaffold = run_inline(fast_cfg(*strategy, "client=scaffold"), tmp_path / "scaffold")
    d = json.loads((tmp_path / "plain" / "summary.json").read_text())["dense_payload_bytes"]
    per_message = d  # each control variate is a dense fp32 payload of the model's size
    assert scaffold["total_bytes_up"] - plain["total_bytes_up"] == 2 * 4 * per_message
    assert scaffold["total_bytes_down"] - plain["total_bytes_down"] == 2 * 4 * per_message
    assert scaffold["final_accuracy"] > scaffold["initial_accuracy"]


def test_fedprox_changes_training_and_mu_zero_does_not(fast_cfg, tmp_path):
    base = run_inline(fast_cfg("num_rounds=3"), tmp_path / "a")
    zero = run_inline(fast_cfg("num_rounds=3", "client=fedprox", "client.mu=0"), tmp_path / "b")
    run_inline(fast_cfg("num_rounds=3", "client=fedprox", "client.mu=1.0"), tmp_path / "c")
    assert zero["final_accuracy"] == base["final_accuracy"] and zero["total_bytes_up"] == base["total_bytes_up"]
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ac"]
    assert losses[0][0] != losses[1][0]  # the proximal term acts from the second local step on
