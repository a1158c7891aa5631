"""Local SGD on a client's shard and centralized evaluation; plain PyTorch, no Flower."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedcomp.data import TensorData


def local_steps(n: int, *, epochs: int, steps: int | None, batch_size: int) -> int:
    """Mini-batches one local training run takes on ``n`` samples."""
    return steps if steps is not None else epochs * -(-n // batch_size)


def samples_trained(n: int, *, epochs: int, steps: int | None, batch_size: int) -> int:
    """Samples one local training run processes (each pass ends on a partial batch)."""
    per_pass = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    total = local_steps(n, epochs=epochs, steps=steps, batch_size=batch_size)
    full, rest = divmod(total, len(per_pass)) if per_pass else (0, 0)
    return full * n + sum(per_pass[:rest])


def mean_gradient_sq_norm(update: torch.Tensor, n: int, training: dict) -> float:
    """||update||^2 / (lr x local steps)^2: the squared norm of the mean local gradient of a
    plain-SGD run (``training``: ``train_local``'s keyword arguments) that produced ``update``.
    With momentum or weight decay this is the norm of the mean step direction instead."""
    steps = local_steps(n, epochs=training["epochs"], steps=training["steps"], batch_size=training["batch_size"])
    return float(update.square().sum()) / (training["lr"] * steps) ** 2


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *, epochs: int,
    steps: int | None, batch_size: int, lr: float, momentum: float, weight_decay: float,
    generator: torch.Generator, momentum_buffers: dict[str, torch.Tensor] | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
) -> float:
    """Run SGD on the samples ``indices`` of (x, y): ``steps`` mini-batches if given, else
    ``epochs`` passes. Batches come from a fresh permutation per pass and are gathered from
    the shared dataset tensors, so no per-client copy of the data is made.

    ``momentum_buffers`` (parameter name -> buffer) carries the optimizer's momentum across
    calls: it is loaded before the first step and updated in place afterwards (CPU tensors).
    A missing buffer starts at zero, which for SGD without dampening is exactly PyTorch's
    first-step initialisation. Without it, momentum lives for this call only.
    ``grad_hook(model)`` runs after each backward pass, before the step (a client algorithm's
    gradient correction: FedProx, SCAFFOLD). Returns the mean training loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    carried = momentum_buffers is not None and momentum > 0
    if carried:
        for name, p in model.named_parameters():
            if name in momentum_buffers:
                opt.state[p]["momentum_buffer"] = momentum_buffers[name].to(p.device, copy=True)
    n = len(indices)
    total = local_steps(n, epochs=epochs, steps=steps, batch_size=batch_size)
    loss_sum, done = torch.zeros((), device=x.device), 0
    while done < total:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done == total:
                break
            idx = indices[perm[start : start + batch_size]].to(x.device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if grad_hook is not None:
                grad_hook(model)
            opt.step()
            loss_sum += loss.detach()
            done += 1
    if carried:
        for name, p in model.named_parameters():
            if (buf := opt.state[p].get("momentum_buffer")) is not None:
                momentum_buffers[name] = buf.detach().cpu()
    return float(loss_sum) / max(total, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, batch_size: int) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy) of ``model`` on ``data``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        out = model(data.x[start : start + batch_size])
        target = data.y[start : start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
    return correct / len(data), loss_sum / len(data)
