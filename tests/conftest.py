import pytest

from fedcomp.config import compose_config

FAST = [
    "dataset=synthetic", "model=mlp", "model.hidden=[16]", "simulation.num_clients=4",
    "num_rounds=2", "progress=false", "train.steps=3",
]


@pytest.fixture
def fast_cfg():
    """Factory for a small synthetic experiment config, with extra overrides."""
    return lambda *extra: compose_config([*FAST, *extra])
