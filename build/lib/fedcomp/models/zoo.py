"""Models: logreg, mlp, cnn4, vgg11s (no batch-norm), resnet18 (CIFAR-style)."""

from __future__ import annotations

import math

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from torch import nn


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200, 200)) -> nn.Module:
    """McMahan et al.'s 2NN by default (two hidden layers of 200 ReLU units)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def cnn4(input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (32, 64), hidden: int = 512) -> nn.Module:
    """Two 5x5 conv + 2x2 max-pool blocks and two dense layers (McMahan et al. 2017's CNN,
    the "4-layer CNN" of the HGC paper's FEMNIST runs); 1.66M parameters on 28x28x1."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels[0], 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels[1] * (h // 4) * (w // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


VGG11_PLAN = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11s(input_shape: tuple[int, ...], num_classes: int, width: float = 0.25) -> nn.Module:
    """VGG-11 with channel counts scaled by ``width`` and no batch-norm (DAGC's VGG11s).
    Pools use ceil mode so 28x28 inputs survive all five of them."""
    layers: list[nn.Module] = []
    c = input_shape[0]
    for item in VGG11_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            out = max(8, int(item * width))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            c = out
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c, c), nn.ReLU(), nn.Linear(c, num_classes),
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(2, channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(out)) + self.shortcut(x))


def resnet18(input_shape: tuple[int, ...], num_classes: int, norm: str = "group") -> nn.Module:
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool; 11.2M parameters on CIFAR-10).

    GroupNorm by default: batch-norm running statistics are not parameters, drift apart under
    non-IID data and are not what gradient compressors are designed for. ``norm="batch"`` is
    available; its float buffers then travel with the parameters.
    """
    stem = [nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False), _norm(norm, 64), nn.ReLU()]
    blocks, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [_BasicBlock(cin, cout, stride, norm), _BasicBlock(cout, cout, 1, norm)]
        cin = cout
    return nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


MODELS = {"logreg": logreg, "mlp": mlp, "cnn4": cnn4, "vgg11s": vgg11s, "resnet18": resnet18}


def build_model(cfg, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build the model a ``model`` config group entry describes, initialised from ``seed``:
    ``name`` of the zoo, or ``_target_`` a factory of the user's called as
    ``factory(input_shape, num_classes, **params)``."""
    params = {k: tuple(v) if isinstance(v, list) else v
              for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("name", "_target_")}
    if cfg.get("_target_"):
        factory = get_object(cfg._target_)
    elif cfg.name in MODELS:
        factory = MODELS[cfg.name]
    else:
        raise ValueError(f"unknown model {cfg.name!r}; known: {sorted(MODELS)}, or give _target_")
    if len(input_shape) == 1 and cfg.get("name") in ("cnn4", "vgg11s", "resnet18"):
        raise ValueError(f"model {cfg.name} needs image input, the dataset gives {input_shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(input_shape, num_classes, **params)
