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
