import pytest
import torch
from omegaconf import OmegaConf

from fedcomp.models import StateLayout, build_model


@pytest.mark.parametrize(
    "name, shape, params",
    [
        ("logreg", (1, 28, 28), 7850),
        ("mlp", (1, 28, 28), 199210),
        ("cnn4", (1, 28, 28), 1663370),
        ("vgg11s", (1, 28, 28), None),
        ("vgg11s", (3, 32, 32), None),
        ("resnet18", (3, 32, 32), 11173962),
    ],
)
def test_models_forward_and_size(name, shape, params):
    model = build_model(OmegaConf.create({"name": name}), shape, 10, seed=0)
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    if params is not None:
        assert StateLayout.of(model).numel == params
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) or name == "resnet18"


def test_same_seed_same_init():
    cfg = OmegaConf.create({"name": "cnn4"})
    a, b = (StateLayout.of(m).flatten(m) for m in (build_model(cfg, (1, 28, 28), 10, 1) for _ in range(2)))
    assert torch.equal(a, b)


def test_layout_round_trip_includes_float_buffers_only():
    model = build_model(OmegaConf.create({"name": "resnet18", "norm": "batch"}), (3, 32, 32), 10, 0)
    layout = StateLayout.of(model)
    assert any(n.endswith("running_mean") for n in layout.names)
    assert not any(n.endswith("num_batches_tracked") for n in layout.names)
    flat = torch.randn(layout.numel)
    layout.load(model, flat)
    assert torch.equal(layout.flatten(model), flat)


def test_image_models_refuse_vector_input():
    with pytest.raises(ValueError, match="image input"):
        build_model(OmegaConf.create({"name": "cnn4"}), (32,), 10, 0)


def test_a_bound_model_is_a_view_of_its_flat_vector():
    """``StateLayout.bind``: parameters and float buffers (batch-norm statistics) become views
    of one vector in layout order; writing either side shows on the other, and the model
    computes as it did."""
    model = build_model(OmegaConf.create({"name": "resnet18", "norm": "batch"}), (3, 32, 32), 10, 0)
    layout = StateLayout.of(model)
    before, x = layout.flatten(model), torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)
    flat = layout.bind(model)
    assert torch.equal(flat, before) and torch.equal(model(x), expected)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    flat.copy_(torch.randn(layout.numel))
    assert torch.equal(layout.flatten(model), flat)
    model.train()(x).square().mean().backward()  # batch norm updates its running statistics in place
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(layout.flatten(model), flat)
    assert all(b.dtype == torch.int64 for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))


def test_bind_refuses_tied_and_non_float32_state():
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    double = torch.nn.Linear(4, 2).double()
    for model in (tied, double):
        params = list(model.parameters())
        assert StateLayout.of(model).bind(model) is None
        assert all(a is b for a, b in zip(params, model.parameters()))
