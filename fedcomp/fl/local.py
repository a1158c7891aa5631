"""Local SGD on a client's shard and centralized evaluation; plain PyTorch, no Flower."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


def mean_gradient_sq_norm(update: torch.Tensor, n: int, training: dict, sq_norm: float | None = None) -> float:
    """||update||^2 / (lr x local steps)^2: the squared norm of the mean local gradient of a
    plain-SGD run (``training``: ``train_local``'s keyword arguments) that produced ``update``.
    With momentum or weight decay this is the norm of the mean step direction instead.
    ``sq_norm``: ||update||^2 computed already (``torch.dot`` of the update, as here)."""
    steps = local_steps(n, epochs=training["epochs"], steps=training["steps"], batch_size=training["batch_size"])
    if sq_norm is None:
        sq_norm = float(torch.dot(update, update))  # one pass, no temporary
    return sq_norm / (training["lr"] * steps) ** 2


def batches(indices: torch.Tensor, *, total: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The sample indices of ``total`` mini-batches: a fresh permutation of ``indices`` per pass,
    cut into ``batch_size`` pieces (each pass ends on a partial batch)."""
    n, done = len(indices), 0
    while done < total:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done == total:
                return
            yield indices[perm[start : start + batch_size]]
            done += 1


def sgd_step_(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, *, lr: float, momentum: float,
              weight_decay: float) -> torch.Tensor | None:
    """One SGD step of ``p`` in place (``torch.optim.SGD``'s single-tensor arithmetic, no
    dampening, no Nesterov): d = grad + wd p; with momentum, buf <- mu buf + d (a copy of d at
    the first step, ``buf`` None) and d = buf; p <- p - lr d. Returns the momentum buffer."""
    d = grad if weight_decay == 0 else grad.add(p, alpha=weight_decay)
    if momentum != 0:
        if buf is None:
            buf = torch.clone(d).detach()
        else:
            buf.mul_(momentum).add_(d)
        d = buf
    p.add_(d, alpha=-lr)
    return buf


class LocalSGD:
    """SGD with momentum and weight decay (no dampening, no Nesterov): the arithmetic of
    ``torch.optim.SGD``'s single-tensor path, step for step and bit for bit (tested), written
    out because constructing any ``torch.optim`` optimizer first imports torch's compiler stack
    (torch._dynamo), several seconds of start-up for every run and every worker process.

    ``buffers[i]`` is parameter i's momentum buffer, None until its first step (then a copy of
    the first step's direction, as PyTorch initialises it)."""

    def __init__(self, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float,
                 buffers: list[torch.Tensor | None] | None = None) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers = list(buffers) if buffers is not None else [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.buffers[i] = sgd_step_(p, p.grad, self.buffers[i], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


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
    named = list(model.named_parameters())
    carried = momentum_buffers is not None and momentum > 0
    held = [momentum_buffers.get(name) if carried else None for name, _ in named]
    opt = LocalSGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay,
                   buffers=[None if b is None else b.to(p.device, copy=True) for b, (_, p) in zip(held, named)])
    total = local_steps(len(indices), epochs=epochs, steps=steps, batch_size=batch_size)
    loss_sum = torch.zeros((), device=x.device)
    for batch in batches(indices, total=total, batch_size=batch_size, generator=generator):
        idx = batch.to(x.device, non_blocking=True)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if grad_hook is not None:
            grad_hook(model)
        opt.step()
        loss_sum += loss.detach()
    if carried:
        for (name, _), buf in zip(named, opt.buffers):
            if buf is not None:
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
