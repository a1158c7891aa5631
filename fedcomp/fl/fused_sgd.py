"""A cohort's forward pass layer by layer, with each Linear layer's SGD step fused into its
backward pass (the batched engine's step for Sequential models).

The general cohort step (``fedcomp.fl.batched``) has autograd write every client's gradient and
then reads it back to update. For a Linear layer that is two extra passes over the cohort's
stacked weights, and they dominate on a CPU: the mlp's first layer is 50 x 200 x 784 floats,
31 MB, which do not stay in the caches from one operation to the next. Here a Linear layer's
backward computes its input's gradient with the weights it ran with and then steps the weights
in place, the weight gradient delta^T x of nn.Linear's backward going straight into one batched
product (``torch.baddbmm_``: C <- beta C + alpha A B) and never stored:

    without momentum:  W <- (1 - lr wd) W - lr delta^T x
    with momentum mu:  B <- mu B + delta^T x (B <- delta^T x at the first step);  B <- B + wd W;  W <- W - lr B

which is ``LocalSGD``'s step, p <- p - lr d with d = grad + wd p, the momentum buffer
B <- mu B + d. The bias and every other layer's parameters take the same step from their
materialised gradients (``SGD.step_``); other layers run vmapped on their own stacked
parameters and are stepped by the caller. The mlp's 50-client step (batch 10; forward, backward
and update, no momentum) took 4.2-4.7 ms against 8.7-12 ms for the general step on the 2-core CPU.

Where every client of the cohort starts from the same model (the round's broadcast) and no
momentum buffers are carried in, a Linear weight whose gradient factors over the round are
smaller than the weight is not stacked or stepped at all: ``LowRankWeights`` keeps the shared
start and the factors, and writes each client's update once at the end. The mlp's 50-client
cohort (6 steps of batch 10) trained in 36-37 ms against 41-44 ms, cnn4's in 1.38-1.40 s against
1.72-1.77 s, on the 2-core CPU.

Applies to ``nn.Sequential`` models (nested ones are flattened) in which no module appears
twice; ``fused_plan`` returns None otherwise and the engine takes the general step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedcomp.fl.local import sgd_step_


@dataclass
class SGD:
    """``LocalSGD``'s step on a cohort's stacked parameters; ``buffers`` holds the stacked
    momentum buffers by parameter name (carried ones given, the others made at the first step)."""

    lr: float
    momentum: float
    weight_decay: float
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def step_(self, name: str, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Step ``p`` in place from its gradient (``sgd_step_``, the sequential loop's step)."""
        buf = sgd_step_(p, grad, self.buffers.get(name), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if buf is not None:
            self.buffers[name] = buf

    def step_product_(self, name: str, p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Step ``p`` in place from the gradient ``a @ b`` (batched), never stored."""
        if self.momentum == 0:
            p.baddbmm_(a, b, beta=1.0 - self.lr * self.weight_decay, alpha=-self.lr)
            return
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.bmm(a, b)
        else:
            buf.baddbmm_(a, b, beta=self.momentum)
        if self.weight_decay != 0:
            buf.add_(p, alpha=self.weight_decay)
        p.add_(buf, alpha=-self.lr)


class _SteppedLinear(torch.autograd.Function):
    """A Linear layer on stacked inputs ``x`` (clients, rows, in) and weights (clients, out, in)
    whose backward steps the weights and bias in place (``names``: theirs, for ``sgd``'s
    buffers) and returns no gradient for them. ``anchor`` is a scalar that requires grad, so
    that the backward runs even where ``x`` does not require grad (the first layer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, names: dict[str, str], sgd: SGD):  # noqa: ARG004 -- anchor only links the graph
        ctx.save_for_backward(x, weight)
        ctx.bias, ctx.names, ctx.sgd = bias, names, sgd
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, delta):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(delta, weight) if ctx.needs_input_grad[0] else None  # before the weights move
        ctx.sgd.step_product_(ctx.names["weight"], weight, delta.transpose(1, 2), x)
        if ctx.bias is not None:
            ctx.sgd.step_(ctx.names["bias"], ctx.bias, delta.sum(1))
        return grad_x, None, None, None, None, None


class LowRankWeights:
    """A cohort's Linear weights, all clients starting from one shared W0, kept as W0 and the
    factors of their SGD steps instead of as stacked weights.

    A Linear weight's gradient at step s is delta_s^T x_s (the layer's output gradient and
    input, ``rows_s`` of each), rank ``rows_s`` per client. ``LocalSGD``'s step (d = g + wd W;
    with momentum mu, B <- mu B + d, B = d at the first step; W <- W - lr d) is linear in W0
    and the gradients, with scalar coefficients the same for every layer and client:

        W_t = a_t W0 + sum_{s<t} c_{t,s} delta_s^T x_s

    so a step's forward pass is x W_t^T = a_t (x W0^T) + sum_s c_{t,s} (x x_s^T) delta_s: one
    product with the shared W0 over the whole cohort's rows and two small batched products
    with the factors kept so far; the input gradient delta W_t likewise. The weights are never
    materialised until the update W_T - W0 is written out, once. Equal to the stepped weights
    up to floating-point summation order. Worth it while the factors are smaller than the
    weights (``FusedPlan.low_rank_weights``): the mlp's 784 x 200 layer, 60 rows a round, is
    31 MB of stacked weights for 50 clients, read and written at every step, against 12 MB of
    factors. Momentum buffers are implied by the same coefficients, so none can be carried in.
    """

    def __init__(self, start: dict[str, torch.Tensor], clients: int, rows: int, sgd: SGD) -> None:
        self.start, self.sgd = start, sgd
        self.inputs = {n: w.new_empty(clients, rows, w.shape[1]) for n, w in start.items()}
        self.deltas = {n: w.new_empty(clients, rows, w.shape[0]) for n, w in start.items()}
        self.scale, self.coefs = 1.0, []  # a_t and c_{t,s}, one per step so far
        self.buffer_scale, self.buffer_coefs = 0.0, []  # the momentum buffer's, likewise
        self.rows: list[int] = []
        self._row_coefs = next(iter(start.values())).new_empty(0)  # c_{t,s} for each row kept

    def __contains__(self, name: str) -> bool:
        return name in self.start

    @property
    def filled(self) -> int:
        """Rows of factors kept so far (every step's rows, each with its coefficient)."""
        return self._row_coefs.numel()

    def forward(self, name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W_t^T (+ bias) for each client's rows ``x`` (clients, rows, in)."""
        return self._product(x, self.start[name].t(), bias, self.inputs[name], self.deltas[name])

    def input_gradient(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """delta W_t for each client's output gradient ``delta`` (clients, rows, out)."""
        return self._product(delta, self.start[name], None, self.deltas[name], self.inputs[name])

    def _product(self, h: torch.Tensor, shared: torch.Tensor, bias: torch.Tensor | None, left: torch.Tensor,
                 right: torch.Tensor) -> torch.Tensor:
        clients, rows, _ = h.shape
        out = torch.mm(h.reshape(clients * rows, -1), shared).view(clients, rows, -1)
        if self.scale != 1.0:
            out.mul_(self.scale)
        if bias is not None:
            out.add_(bias.unsqueeze(1))
        if self.filled:
            kept = slice(0, self.filled)
            out.baddbmm_(torch.bmm(h, left[:, kept].transpose(1, 2)).mul_(self._row_coefs), right[:, kept])
        return out

    def record(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Keep this step's factors of the layer's gradient delta^T x."""
        rows = slice(self.filled, self.filled + x.shape[1])
        self.inputs[name][:, rows].copy_(x)
        self.deltas[name][:, rows].copy_(delta)

    def advance(self, rows: int) -> None:
        """The step is taken (every layer has recorded its ``rows`` of factors): the
        coefficients move on by ``LocalSGD``'s arithmetic."""
        lr, momentum, weight_decay = self.sgd.lr, self.sgd.momentum, self.sgd.weight_decay
        direction_scale = weight_decay * self.scale
        direction = [weight_decay * c for c in self.coefs] + [1.0]
        if momentum != 0:
            if self.rows:
                direction_scale += momentum * self.buffer_scale
                direction = [momentum * b + d for b, d in zip([*self.buffer_coefs, 0.0], direction)]
            self.buffer_scale, self.buffer_coefs = direction_scale, direction
        self.scale -= lr * direction_scale
        self.coefs = [c - lr * d for c, d in zip([*self.coefs, 0.0], direction)]
        self.rows.append(rows)
        per_row = torch.repeat_interleave(torch.tensor(self.coefs, dtype=torch.float64), torch.tensor(self.rows))
        self._row_coefs = per_row.to(self._row_coefs.device, self._row_coefs.dtype)

    def write_update(self, name: str, client: int, out: torch.Tensor) -> None:
        """W_T - W0 of one client into ``out`` (out, in): beta = 0 without weight decay, W0
        then not read at all."""
        if not self.filled:
            out.zero_()
            return
        kept = slice(0, self.filled)
        steps = self.deltas[name][client, kept] * self._row_coefs[:, None]
        torch.addmm(self.start[name], steps.t(), self.inputs[name][client, kept], beta=self.scale - 1.0, out=out)


class _LowRankLinear(torch.autograd.Function):
    """A Linear layer whose weight is ``low_rank``'s (by ``names["weight"]``): the forward from
    the shared start and the factors so far; the backward returns the input's gradient, keeps
    the step's factors and steps the stacked bias in place. ``anchor`` as for ``_SteppedLinear``."""

    @staticmethod
    def forward(ctx, x, bias, anchor, names: dict[str, str], sgd: SGD, low_rank: LowRankWeights):  # noqa: ARG004 -- anchor only links the graph
        ctx.save_for_backward(x)
        ctx.bias, ctx.names, ctx.sgd, ctx.low_rank = bias, names, sgd, low_rank
        return low_rank.forward(names["weight"], x, bias)

    @staticmethod
    def backward(ctx, delta):
        (x,) = ctx.saved_tensors
        name = ctx.names["weight"]
        grad_x = ctx.low_rank.input_gradient(name, delta) if ctx.needs_input_grad[0] else None
        ctx.low_rank.record(name, x, delta)
        if ctx.bias is not None:
            ctx.sgd.step_(ctx.names["bias"], ctx.bias, delta.sum(1))
        return grad_x, None, None, None, None, None


# Elementwise layers are applied to the stacked tensor as they are: the clients' axis changes
# nothing for them, and vmapping them cost 0.1-0.2 ms each per step (the mlp's 50-client step
# took 4.3-4.7 ms with ReLU applied directly against 4.9-5.3 ms vmapped).
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)

# Layers that act on each channel alone: on channel-grouped activations they run as they are.
_PER_CHANNEL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


@dataclass
class _ChannelGrouped:
    """A cohort's activations as one batch with the clients' channels side by side,
    (rows, clients x channels, *spatial): a grouped convolution's layout, in which convolutions,
    elementwise layers and per-channel pools follow one another without moving the clients'
    axis back and forth. On the CPU the channels are innermost in memory (channels-last; see
    ``_grouped``), and the layers after a convolution keep that order."""

    t: torch.Tensor
    clients: int

    def client_first(self) -> torch.Tensor:
        rows, _, *spatial = self.t.shape
        return self.t.view(rows, self.clients, -1, *spatial).transpose(0, 1)


Activations = torch.Tensor | _ChannelGrouped  # a tensor: clients first
Step = Callable[[dict[str, torch.Tensor], Activations, SGD, LowRankWeights | None], Activations]  # (params, h, sgd, low_rank) -> h


def _grouped(h: Activations) -> _ChannelGrouped:
    """Clients-first activations (clients, rows, channels, *spatial) channel-grouped. On the CPU
    a 2-d convolution's input is laid out channels-last, so that oneDNN's grouped convolution and
    everything after it (ReLU, max-pool) run channels-last too: PyTorch's NCHW max-pool scans each
    window in scalar code, 29 ms a step for cnn4's first pool over 50 clients of batch 10 against
    3.8 ms channels-last, and the first convolution ran in 4.8 against 10.7 ms. cnn4's two
    convolution blocks (convolution, pool, ReLU; forward and backward) took 130 against 179 ms a
    step on the 2-core CPU. GPUs keep the default layout (not measured there)."""
    if isinstance(h, _ChannelGrouped):
        return h
    clients, rows, channels, *spatial = h.shape
    if h.device.type == "cpu" and len(spatial) == 2:
        # (rows, H, W, clients x channels) in memory, one copy; viewed as (rows, clients x channels, H, W)
        t = h.permute(1, 3, 4, 0, 2).contiguous().view(rows, *spatial, clients * channels).permute(0, 3, 1, 2)
        return _ChannelGrouped(t, clients)
    return _ChannelGrouped(h.transpose(0, 1).reshape(rows, clients * channels, *spatial), clients)


def _client_first(h: Activations) -> torch.Tensor:
    return h.client_first() if isinstance(h, _ChannelGrouped) else h


def _as_is(module: nn.Module, h: Activations) -> Activations:
    """An elementwise layer on either layout, or a per-channel one on channel-grouped activations."""
    return _ChannelGrouped(module(h.t), h.clients) if isinstance(h, _ChannelGrouped) else module(h)


class FusedPlan:
    """The model's layers in order as steps on the stacked activations: each Linear layer stepped
    in its backward (``stepped``: the names of the parameters so stepped), each 2-d convolution
    as one grouped convolution of all clients (its bias fused in, activations kept channel-
    grouped through the elementwise layers and pools after it), elementwise layers applied
    directly, every other layer vmapped with its own parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.stepped: set[str] = set()
        self.linear_shapes: dict[str, tuple[int, int]] = {}  # weight name -> (out, in)
        self.anchor = torch.zeros((), device=next(model.parameters()).device, requires_grad=True)
        self._steps: list[Step] = []
        prefixes = {id(m): name for name, m in model.named_modules()}
        for module in _pool_before_relu(_leaves(model)):
            prefix = prefixes[id(module)]
            names = {local: f"{prefix}.{local}" if prefix else local for local, _ in module.named_parameters()}
            if type(module) is nn.Linear:
                self.stepped.update(names.values())
                self.linear_shapes[names["weight"]] = (module.out_features, module.in_features)
                self._steps.append(functools.partial(self._linear, names))
            elif type(module) is nn.Conv2d and module.padding_mode == "zeros":
                self._steps.append(functools.partial(_convolution, module, names))
            elif type(module) in _ELEMENTWISE:
                self._steps.append(lambda params, h, sgd, low_rank, m=module: _as_is(m, h))
            else:
                vmapped = vmap(lambda p, h, m=module: functional_call(m, p, (h,)))
                if type(module) in _PER_CHANNEL and not getattr(module, "return_indices", False):
                    # On channel-grouped activations as it is; clients-first (a pool before any
                    # convolution) it needs the per-client shape, as every other layer.
                    self._steps.append(lambda params, h, sgd, low_rank, m=module, f=vmapped:
                                       _as_is(m, h) if isinstance(h, _ChannelGrouped) else f({}, h))
                else:
                    self._steps.append(lambda params, h, sgd, low_rank, f=vmapped, names=names:
                                       f({k: params[v] for k, v in names.items()}, _client_first(h)))

    def low_rank_weights(self, rows: int) -> list[str]:
        """The Linear weights whose gradient factors over ``rows`` rows a client (a cohort's
        whole local training) take no more room than the weights: those ``LowRankWeights``
        can hold."""
        return [name for name, (out, inp) in self.linear_shapes.items() if rows * (out + inp) <= out * inp]

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor, sgd: SGD, low_rank: LowRankWeights | None = None) -> torch.Tensor:
        """The cohort's outputs (clients first); backward through them steps the Linear layers
        (those in ``low_rank`` by keeping their factors; ``params`` lacks their weights)."""
        h = x
        for step in self._steps:
            h = step(params, h, sgd, low_rank)
        return _client_first(h)

    def _linear(self, names: dict[str, str], params: dict[str, torch.Tensor], h: torch.Tensor, sgd: SGD,
                low_rank: LowRankWeights | None) -> torch.Tensor:
        bias = params[names["bias"]] if "bias" in names else None
        h = _client_first(h)
        rows = h.reshape(h.shape[0], -1, h.shape[-1])  # (clients, rows, in) whatever the per-client shape
        if low_rank is not None and names["weight"] in low_rank:
            out = _LowRankLinear.apply(rows, bias, self.anchor, names, sgd, low_rank)
        else:
            out = _SteppedLinear.apply(rows, params[names["weight"]], bias, self.anchor, names, sgd)
        return out.reshape(*h.shape[:-1], out.shape[-1])


def _convolution(module: nn.Conv2d, names: dict[str, str], params: dict[str, torch.Tensor], h: Activations, sgd: SGD,  # noqa: ARG001
                 low_rank: LowRankWeights | None) -> _ChannelGrouped:  # noqa: ARG001 -- a Step's signature
    """Every client's convolution as one grouped convolution over the channel-grouped
    activations, each client's weights (and bias) its own groups. vmap runs the same grouped
    convolution but adds the bias apart and moves the clients' axis in and out around it: on
    the 2-core CPU, cnn4's 1 -> 32 layer for 50 clients of batch 10, forward and backward,
    took 84 ms this way against 99 ms vmapped, the 32 -> 64 layer 103 against 121 ms."""
    g = _grouped(h)
    weight, bias = params[names["weight"]], params.get(names.get("bias", ""))
    out = nn.functional.conv2d(g.t, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                               module.stride, module.padding, module.dilation, g.clients * module.groups)
    return _ChannelGrouped(out, g.clients)


def _pool_before_relu(layers: list[nn.Module]) -> list[nn.Module]:
    """``layers`` with every ReLU followed by a max-pool run after it instead. They commute
    exactly: max(relu(x)) = relu(max(x)), and the gradient reaches the same input (a window's
    first maximum either way where that is positive, nothing where it is not), so values and
    gradients are unchanged to the bit, and the ReLU and its backward run on a quarter of the
    activations. On cnn4's 50-client cohort (2-core CPU) the first ReLU's backward had taken
    about a tenth of the step."""
    out = list(layers)
    for i in range(len(out) - 1):
        if type(out[i]) is nn.ReLU and type(out[i + 1]) is nn.MaxPool2d and not out[i + 1].return_indices:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _applies_in_order(module: nn.Module) -> bool:
    """A Sequential that applies its modules in order (not a subclass with a forward of its own)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The modules a Sequential applies in order, nested Sequentials flattened."""
    out = []
    for module in model:
        out.extend(_leaves(module) if _applies_in_order(module) else [module])
    return out


def fused_plan(model: nn.Module) -> FusedPlan | None:
    """The fused plan for ``model``, or None where the model is not a Sequential applying its
    modules in order, has no Linear layer, or applies a module or parameter twice (a shared
    layer's step needs its summed gradient)."""
    if not _applies_in_order(model):
        return None
    leaves = _leaves(model)
    if len({id(m) for m in leaves}) < len(leaves) or not any(type(m) is nn.Linear for m in leaves):
        return None
    params = [id(p) for m in leaves for p in m.parameters()]
    if len(set(params)) < len(params):
        return None
    return FusedPlan(model)


def cohort_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each client's mean cross-entropy over its batch (``logits``: clients, rows, classes).
    Computed outside vmap: under vmap ``cross_entropy`` runs a Python decomposition whose first
    call imports sympy (a run's first cohort took 0.32 s with it, 0.008 s without)."""
    flat = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return flat.view(y.shape[0], -1).mean(1)
