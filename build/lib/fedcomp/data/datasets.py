"""Dataset registry: ``load_dataset(cfg) -> (train, test)`` as in-memory tensors.

Everything is normalised once at load time and kept as one tensor, so local training indexes
batches directly instead of paying a DataLoader per client per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from fedcomp.config.plugins import target_params
from fedcomp.data.idx import read_idx

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not where the config says; the message says how to get them."""


@dataclass(frozen=True)
class TensorData:
    x: torch.Tensor  # float32, N x C x H x W (or N x F), normalised
    y: torch.Tensor  # int64 labels in [0, num_classes)
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _images(x: np.ndarray, y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], num_classes: int) -> TensorData:
    """uint8 images (N,H,W) or (N,H,W,C) -> normalised float N,C,H,W."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return TensorData((t - m) / s, torch.from_numpy(np.asarray(y, dtype=np.int64)), num_classes)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for d in candidates:
        if all(_idx_file(d, stem) is not None for pair in _IDX_FILES.values() for stem in pair):
            return d
    return None


def _idx_file(d: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (d / name).is_file():
            return d / name
    return None


def _load_idx_split(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(_idx_file(d, stem)) for stem in _IDX_FILES[split])
    if len(images) != len(labels):
        raise ValueError(f"{d}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


FMNIST_STATS = ((0.2860,), (0.3530,))
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def load_fmnist(root: str | None, download: bool) -> tuple[TensorData, TensorData]:
    """FashionMNIST from IDX files: ``root`` itself or its torchvision layout
    ``root/FashionMNIST/raw`` when a root is given (never another copy), else the Debian
    package's directory; torchvision downloads into ``root`` when asked to."""
    roots = [Path(root).expanduser()] if root else []
    candidates = [p for r in roots for p in (r, r / "FashionMNIST" / "raw")] if root else [DEBIAN_FMNIST]
    found = _find_idx_dir(candidates)
    if found is None and download and root:
        import torchvision

        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
        found = _find_idx_dir(candidates)
    if found is None:
        raise DatasetMissingError(
            "FashionMNIST not found in "
            + ", ".join(str(c) for c in candidates)
            + ". Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or set dataset.root to a directory with the four IDX files, "
            "or set dataset.download=true on a machine with internet access."
        )
    return tuple(_images(*_load_idx_split(found, s), *FMNIST_STATS, 10) for s in ("train", "test"))


def _torchvision_splits(dataset: str, root: str | None, download: bool) -> list:
    """Train and test split of ``torchvision.datasets.<dataset>``, or a clear error."""
    import torchvision

    root = str(Path(root or "data").expanduser())
    try:
        return [getattr(torchvision.datasets, dataset)(root, train=t, download=download) for t in (True, False)]
    except RuntimeError as exc:
        raise DatasetMissingError(
            f"{dataset} not found under {root!r}. Set dataset.download=true on a machine with internet "
            f"access, or place the torchvision-format files there (dataset.root)."
        ) from exc


def load_mnist(root: str | None, download: bool) -> tuple[TensorData, TensorData]:
    splits = _torchvision_splits("MNIST", root, download)
    return tuple(_images(s.data.numpy(), s.targets.numpy(), *MNIST_STATS, 10) for s in splits)


def load_cifar10(root: str | None, download: bool) -> tuple[TensorData, TensorData]:
    splits = _torchvision_splits("CIFAR10", root, download)
    return tuple(_images(s.data, np.asarray(s.targets), *CIFAR10_STATS, 10) for s in splits)


def load_synthetic(
    num_train: int = 2000, num_test: int = 500, shape: tuple[int, ...] = (1, 12, 12),
    num_classes: int = 10, seed: int = 0, noise: float = 1.0,
) -> tuple[TensorData, TensorData]:
    """Gaussian class clusters shaped as small images (so every model runs on them):
    learnable in a few steps, needs no files."""
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"synthetic shape must be (channels, height, width), got {shape}")
    g = torch.Generator().manual_seed(seed)
    # Class templates are smooth blobs (a coarse random pattern, upsampled), the kind of
    # structure convolutions pick up; per pixel they sit below the noise.
    coarse = torch.randn(num_classes, shape[0], *(max(1, s // 4) for s in shape[1:]), generator=g)
    centers = 0.7 * torch.nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)

    def draw(n: int) -> TensorData:
        y = torch.randint(num_classes, (n,), generator=g)
        x = centers[y] + noise * torch.randn(n, *shape, generator=g)
        return TensorData(x, y, num_classes)

    return draw(num_train), draw(num_test)


_LOADERS: dict[str, Callable[..., tuple[TensorData, TensorData]]] = {
    "fmnist": load_fmnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
}


@lru_cache(maxsize=4)
def _cached(name: str, root: str | None, download: bool, synthetic: tuple) -> tuple[TensorData, TensorData]:
    if name == "synthetic":
        return load_synthetic(**dict(synthetic))
    return _LOADERS[name](root, download)


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset gives, known without loading it."""

    num_train: int
    input_shape: tuple[int, ...]
    num_classes: int


_SPECS = {"fmnist": DatasetSpec(60000, (1, 28, 28), 10), "mnist": DatasetSpec(60000, (1, 28, 28), 10),
          "cifar10": DatasetSpec(50000, (3, 32, 32), 10)}


def dataset_spec(cfg) -> DatasetSpec | None:
    """Training-set size, input shape and classes of a ``dataset`` config entry, known without
    loading it (a plug-in dataset's ``spec(**params)`` if it has one, else None)."""
    if cfg.get("_target_"):
        spec = getattr(get_object(cfg._target_), "spec", None)
        return spec(**target_params(cfg)) if spec is not None else None
    if cfg.name == "synthetic":
        syn = cfg.get("synthetic") or {}
        return DatasetSpec(int(syn.get("num_train", 2000)), tuple(syn.get("shape", (1, 12, 12))), int(syn.get("num_classes", 10)))
    return _SPECS[cfg.name]


@lru_cache(maxsize=4)
def _cached_plugin(target: str, params: tuple) -> tuple[TensorData, TensorData]:
    train, test = get_object(target)(**dict(params))
    if not isinstance(train, TensorData) or not isinstance(test, TensorData):
        raise TypeError(f"dataset {target} must return (train, test) fedcomp.data.TensorData")
    return train, test


def load_dataset(cfg) -> tuple[TensorData, TensorData]:
    """Load (and cache per process) the dataset a ``dataset`` config group entry describes:
    ``name`` of a built-in, or ``_target_`` a loader of the user's returning (train, test)
    ``TensorData`` (with an optional ``spec(**params) -> DatasetSpec`` for checks before loading)."""
    if cfg.get("_target_"):
        return _cached_plugin(cfg._target_, tuple(sorted(target_params(cfg).items())))
    name = cfg.name
    if name not in (*_LOADERS, "synthetic"):
        raise ValueError(f"unknown dataset {name!r}; known: {sorted((*_LOADERS, 'synthetic'))}")
    params = OmegaConf.to_container(cfg.synthetic) if cfg.get("synthetic") else {}
    # A hashable key for the per-process cache.
    synthetic = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return _cached(name, cfg.get("root"), bool(cfg.get("download", False)), synthetic)
