import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from fedcomp.config import ConfigError, compose_config


def test_default_config_is_valid():
    cfg = compose_config()
    assert cfg.dataset.name == "fmnist"
    assert cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.5
    assert cfg.simulation.num_clients == 10


@pytest.mark.parametrize(
    "override, key",
    [
        ("partition.alpha=0", "partition.alpha"),
        ("partition.alpha=-1", "partition.alpha"),
        ("simulation.fraction=1.5", "simulation.fraction"),
        ("simulation.fraction=0", "simulation.fraction"),
        ("simulation.num_clients=0", "simulation.num_clients"),
        ("train.lr=-0.1", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("num_rounds=0", "num_rounds"),
        ("target_accuracy=1.5", "target_accuracy"),
        ("network.uplink_mbps=0", "network.uplink_mbps"),
        ("simulation.backend=spark", "simulation.backend"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config([override])


def test_group_specific_checks():
    with pytest.raises(ConfigError, match=r"partition\.skew_ratio"):
        compose_config(["partition=volume_skew", "partition.skew_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"model\.hiden"):
        compose_config(["model=mlp", "+model.hiden=3"])
    with pytest.raises(ConfigError, match=r"partition\.bogus"):
        compose_config(["+partition.bogus=1"])


@pytest.mark.parametrize("override", ["num_round=3", "partition.alph=0.1", "simulation.num_client=3"])
def test_misspelled_keys_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    assert override.split("=")[0] in str(err.value)


def test_cli_reports_invalid_config_before_training():
    proc = subprocess.run(
        [sys.executable, "-m", "fedcomp", "partition.alpha=-2", "hydra.run.dir=/tmp/fedcomp-invalid"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "partition.alpha" in proc.stderr and "must be > 0" in proc.stderr
