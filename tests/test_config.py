import re
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


BAD_CONFIGS = [
    (["strategy=hgc", "strategy.ratio=2"], "strategy.ratio"),
    (["strategy=hgc", "strategy.bits=0"], "strategy.bits"),
    (["strategy=hgc", "strategy.bits=9"], "strategy.bits"),
    (["strategy=hgc", "strategy.mask_policy=rotate"], "strategy.mask_policy"),
    (["strategy=hgc", "strategy.round=async"], "strategy.round"),
    (["strategy=hgc", "compressor=topk"], "compressor"),
    (["simulation.num_clients=70000"], "simulation.num_clients"),
    (["partition=shards", "partition.shards_per_client=10", "simulation.num_clients=7000"], "simulation.num_clients"),
    (["controller=dagc", "compressor=qsgd"], "controller"),
    (["controller=uniform", "compressor=none"], "controller"),
    (["controller=nonuniform", "simulation.num_clients=3", "compressor=topk"], "controller.per_client"),
    (["partition=explicit", "simulation.num_clients=3"], "partition.fractions"),
    (["seed=-1"], "seed"),
    (["train.device=cuda:7"], "train.device"),
    (["dataset=synthetic", "dataset.synthetic.shape=[1,2,2]"], "model"),
    (["dataset.root=/nonexistent"], "dataset.root"),
    (["strategy.server_lr=-1"], "strategy.server_lr"),
    (["strategy.round=deadline"], "strategy.round"),
    (["model=resnet18"], "model.name"),
    (["compressor=topk", "compressor.up.ratio=2"], "compressor.up"),
    (["network.heterogeneity.kind=csv", "network.heterogeneity.path=/nope.csv"], "network.heterogeneity.path"),
    (["network.availability.trace=/nope.csv"], "network.availability.trace"),
    (["simulation.faults=[{kind: melt, clients: [0]}]"], "simulation.faults[0]"),
    (["+strategy.bogus=1"], "strategy.bogus"),
]


@pytest.mark.parametrize("overrides, key", BAD_CONFIGS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_configurations_name_the_key_before_loading_data(overrides, key, monkeypatch):
    import fedcomp.data.datasets as datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda cfg: pytest.fail("validation loaded data"))
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        compose_config(overrides)


def test_cli_bad_configuration_is_one_line_never_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "fedcomp", "strategy=hgc", "strategy.bits=9", "hydra.run.dir=/tmp/fedcomp-invalid"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["fedcomp: invalid config: strategy.bits: bits must be in 1..8, got 9"]
