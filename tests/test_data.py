import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from fedcomp.data import DatasetMissingError, load_dataset
from fedcomp.data.datasets import DEBIAN_FMNIST, load_cifar10, load_fmnist, load_mnist, load_synthetic
from fedcomp.data.idx import IdxFormatError, read_idx, write_idx


def fake_mnist_arrays(rng, n):
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_mnist_dir(d, gz, n_train=30, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x, y = fake_mnist_arrays(rng, n)
        ext = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", y)
        arrays[split] = (x, y)
    return arrays


def test_idx_round_trip_gz_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, a)
        assert np.array_equal(read_idx(tmp_path / name), a)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 2), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(IdxFormatError, match="needs"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_fmnist_reader_on_real_format_files(tmp_path, layout):
    if layout == "flat_gz":
        arrays = write_mnist_dir(tmp_path, gz=True)
    else:
        arrays = write_mnist_dir(tmp_path / "FashionMNIST" / "raw", gz=False)
    train, test = load_fmnist(str(tmp_path), download=False)
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (12, 1, 28, 28)
    assert torch.equal(train.y, torch.from_numpy(arrays["train"][1].astype(np.int64)))
    # normalisation is the documented affine map of the raw pixels
    raw = torch.from_numpy(arrays["test"][0][0].astype(np.float32)) / 255
    assert torch.allclose(test.x[0, 0] * 0.3530 + 0.2860, raw, atol=1e-5)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("fedcomp.data.datasets.DEBIAN_FMNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist(str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetMissingError, match="download=true"):
        load_mnist(str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetMissingError, match="download=true"):
        load_cifar10(str(tmp_path / "empty"), download=False)


def test_mnist_through_torchvision(tmp_path):
    arrays = write_mnist_dir(tmp_path / "MNIST" / "raw", gz=False, n_train=20, n_test=10)
    train, test = load_mnist(str(tmp_path), download=False)
    assert len(train) == 20 and len(test) == 10
    assert torch.equal(test.y, torch.from_numpy(arrays["test"][1].astype(np.int64)))


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, 4).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels[name]}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    # torchvision checks the official files' md5 sums; these are tiny stand-ins in the same format.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    train, test = load_cifar10(str(tmp_path), download=False)
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert test.y.tolist() == labels["test_batch"]


def test_synthetic_is_deterministic_and_learnable():
    a, _ = load_synthetic(seed=3)
    b, _ = load_synthetic(seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # nearest class mean already separates the clusters well
    means = torch.stack([a.x[a.y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(a.x.flatten(1), means).argmin(1)
    assert (pred == a.y).float().mean() > 0.8


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = load_dataset(OmegaConf.create({"name": "fmnist", "root": None}))
    assert train.x.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(test.y).tolist() == [1000] * 10
