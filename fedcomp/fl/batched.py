"""The batched engine (``simulation.backend=batched``): a round's cohort trained as one
vmapped computation.

``BatchedGrid`` delivers a round's Messages to the same ClientApp as the inline engine, each
client's round in a greenlet of its own and only one running at a time (so the order of
everything a client does is the inline engine's). A client's round parks at local training
(``fedcomp.fl.cohort``); when all have parked, ``train_cohort`` trains them together, and the
rounds resume one by one to compress and reply. Payloads therefore go through the same
compressors and state as on every engine.

``train_cohort`` groups requests that take the same steps (shard size, batch size, epochs or
steps, learning rate, momentum, weight decay, whether momentum is carried) and runs each group
with ``torch.func``: per-client parameters stacked on a leading axis, per-client batches drawn
from each client's own generator exactly as ``train_local`` draws them, a vmapped forward pass
and one backward pass for every client's gradients, and ``LocalSGD``'s update arithmetic on
the stacked tensors. A Sequential model's Linear layers are stepped inside that backward pass
instead, their gradients never stored, and where the clients share their start, a Linear
weight is kept as that start and the low-rank factors of the clients' steps
(``fedcomp.fl.fused_sgd``); clients on other starts then train as a group of their own. Results
equal the sequential ones up to floating-point summation order inside the batched kernels.
Parameters stepped from their gradients live in the memory layout the gradients come in
(transposed for a vmapped Linear's weight), and the engine's process keeps freed memory for
reuse (``keep_large_allocations``): on CPU both were worth 2x on cnn4's vmapped training.

Supported: models without buffers or randomness in training (no batch norm, no dropout:
``check_model``); client algorithms with a gradient hook (FedProx, SCAFFOLD) train
sequentially inside the same round. An HGC round is two cohorts: the mask owner alone, then
the members on its mask. A group of one client trains in the sequential loop (``train_local``),
which is faster for one.
"""

from __future__ import annotations

import ctypes
import functools
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from greenlet import greenlet
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call, vmap

from fedcomp.fl.client_app import make_client_app
from fedcomp.fl.cohort import TrainingRequest, set_parking, train_in_place
from fedcomp.fl.engine import InlineGrid, call_client_app, client_threads, declare_server_task, state_store
from fedcomp.fl.fused_sgd import SGD, FusedPlan, LowRankWeights, cohort_losses, fused_plan
from fedcomp.fl.local import batches, local_steps, samples_trained
from fedcomp.fl.runtime import Runtime, get_runtime
from fedcomp.fl.server_app import run_server

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def check_model(model: nn.Module) -> None:
    """Refuse models the cohort cannot train as the sequential loop does."""
    if any(True for _ in model.buffers()):
        raise ValueError("the batched engine needs a model without buffers (batch norm keeps running statistics per client); "
                         "use model.norm=group or another backend")
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        raise ValueError("the batched engine cannot draw dropout masks as the sequential loop does; use another backend")


def _batches(request: TrainingRequest) -> list[torch.Tensor]:
    """The sample indices of each of the request's steps, drawn as ``train_local`` draws them."""
    t = request.training
    total = local_steps(len(request.indices), epochs=t["epochs"], steps=t["steps"], batch_size=t["batch_size"])
    return list(batches(request.indices, total=total, batch_size=t["batch_size"], generator=torch.Generator().manual_seed(request.seed)))


def _group_key(request: TrainingRequest) -> tuple:
    t = request.training
    carried = _carries_momentum(request)
    held = tuple(sorted(request.buffers)) if carried else ()
    return (len(request.indices), t["epochs"], t["steps"], t["batch_size"], t["lr"], t["momentum"], t["weight_decay"], carried, held)


def keep_large_allocations() -> None:
    """Serve every allocation from glibc's heap and keep freed memory for reuse.

    glibc gives allocations above 32 MB fresh pages from ``mmap`` and returns them on free, so a
    cohort's stacked tensors (cnn4, 50 clients: 320 MB for one weight gradient) were faulted in
    again at every step: ~40 ms per 320 MB on the 2-core machine; cnn4's vmapped round took 2.1 s
    with this against 2.6 s without. The price: the process keeps its peak memory until it exits.
    A no-op where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc: macOS, musl, Windows
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def train_cohort(rt: Runtime, requests: list[TrainingRequest]) -> None:
    """Fill every request's result, each group of same-shaped requests as one computation."""
    groups: dict[tuple, list[TrainingRequest]] = {}
    for request in requests:
        groups.setdefault(_group_key(request), []).append(request)
    plan = fused_plan(rt.model)
    for group in [part for same_shape in groups.values() for part in _by_start(plan, same_shape)]:
        if len(group) == 1:  # HGC's mask owner, a lone stale replica: the sequential loop is faster for one client
            train_in_place(rt, group[0])
            continue
        start = time.perf_counter()
        _train_group(rt, group, plan)
        share = (time.perf_counter() - start) / len(group)
        for request in group:
            request.compute_s = share


def _by_start(plan: FusedPlan | None, group: list[TrainingRequest]) -> list[list[TrainingRequest]]:
    """``group`` as one computation, or, where its clients start from different models (HGC's
    members on stale replicas) and the model (``plan``: its fused plan) has Linear weights
    ``LowRankWeights`` can hold, as two: the clients sharing the most common start (their
    weights then held as factors) and the others."""
    if not _low_rank_names(plan, group[0]):
        return [group]
    by_start: dict[tuple, list[TrainingRequest]] = {}
    for request in group:
        by_start.setdefault(_start_of(request), []).append(request)
    common = max(by_start.values(), key=len)
    if len(by_start) == 1 or len(common) == 1:
        return [group]
    taken = {id(request) for request in common}
    return [common, [request for request in group if id(request) not in taken]]


def _start_of(request: TrainingRequest) -> tuple:
    """Which vector the request starts from: clients of a round share the one broadcast tensor."""
    return request.w.data_ptr(), request.w.device


def _carries_momentum(request: TrainingRequest) -> bool:
    return request.buffers is not None and request.training["momentum"] > 0


def _rows(request: TrainingRequest) -> int:
    """The rows (samples) the request's whole local training processes."""
    t = request.training
    return samples_trained(len(request.indices), epochs=t["epochs"], steps=t["steps"], batch_size=t["batch_size"])


def _low_rank_names(plan: FusedPlan | None, request: TrainingRequest) -> list[str]:
    """The Linear weights ``LowRankWeights`` can hold for clients training as ``request`` does
    from one shared start: none without a fused plan or where momentum buffers are carried in."""
    return plan.low_rank_weights(_rows(request)) if plan is not None and not _carries_momentum(request) else []


def _train_group(rt: Runtime, group: list[TrainingRequest], plan: FusedPlan | None) -> None:
    model, layout, device = rt.model, rt.layout, rt.device
    flat_dtype = group[0].w.dtype
    model.train()
    t = group[0].training
    lr, momentum, weight_decay = t["lr"], t["momentum"], t["weight_decay"]
    names = [name for name, _ in model.named_parameters()]
    carried = _carries_momentum(group[0])
    stepped = plan.stepped if plan is not None else set()
    steps = list(zip(*[_batches(r) for r in group]))  # per step, each client's batch indices
    # The round's one broadcast, when every client starts from it (the usual case; HGC's stale
    # replicas are the exception), moved to the device once for all its uses: the stacked
    # parameters start from it, its Linear weights can stay shared (LowRankWeights) and the
    # updates are written against it directly.
    start = group[0].w.to(device) if len({_start_of(r) for r in group}) == 1 else None
    shapes = dict(zip(layout.names, layout.shapes))
    bases = {name: piece.view(shapes[name]) for name, piece in zip(layout.names, torch.split(start, layout.sizes))} if start is not None else {}
    low = _low_rank_names(plan, group[0]) if start is not None else []
    pieces = list(zip(*[torch.split(r.w, layout.sizes) for r in group]))
    params = {name: _stacked(name, chunks, shape, device, gradient_layout=name not in stepped,
                             shared=bases.get(name)).requires_grad_(name not in stepped)
              for name, chunks, shape in zip(layout.names, pieces, layout.shapes) if name not in low}
    buffers = {name: _stacked(name, tuple(r.buffers[name] for r in group), params[name].shape[1:], device,
                              gradient_layout=name not in stepped) for name in names if carried and name in group[0].buffers}
    sgd = SGD(lr, momentum, weight_decay, buffers)
    low_rank = LowRankWeights({name: bases[name] for name in low}, len(group), _rows(group[0]), sgd) if low else None

    # Only the forward pass is vmapped; one backward of the summed losses gives every client's
    # gradient (client i's loss depends on its own parameters only). torch.func.grad would do
    # the same but imports torch._dynamo on first use: seconds of start-up. With a fused plan
    # the backward also steps the Linear layers (fedcomp.fl.fused_sgd); the rest is stepped here.
    if plan is None:
        logits_of = vmap(lambda p, x: functional_call(model, p, (x,)))
    else:
        logits_of = functools.partial(plan.logits, sgd=sgd, low_rank=low_rank)
    stepped_here = [name for name in names if name not in stepped]
    anchors = [plan.anchor] if plan is not None else []
    leaves = [params[name] for name in stepped_here]
    loss_sum = torch.zeros(len(group), device=device)
    x, y = rt.train.x, rt.train.y
    with torch.no_grad():
        for batch in steps:
            idx = torch.stack(batch).to(device)
            with torch.enable_grad():
                losses = cohort_losses(logits_of(params, x[idx]), y[idx])
                found = torch.autograd.grad(losses.sum(), leaves + anchors, allow_unused=True, materialize_grads=True)
                grads = dict(zip(stepped_here, found))
            if _adopt_gradient_layouts(params, buffers, grads):
                leaves = [params[name] for name in stepped_here]
            for name in stepped_here:
                sgd.step_(name, params[name], grads[name])
            if low_rank is not None:
                low_rank.advance(len(batch[0]))
            loss_sum += losses.detach()
    # Every client's flat update is a tensor of its own (not a row of one block: a block that
    # any client's state still held at the next round kept the whole cohort's size from being
    # reused, and cnn4's 330 MB came from fresh pages every round, 80k page faults and ~0.4 s on
    # the 2-core VM), written parameter by parameter in the standard layout, from the shared
    # start where there is one, else the trained parameters with the client's start subtracted
    # after; then its squared norm, while it is still in the caches (the mlp's clients, reading
    # their updates back cold for it, took 6.2 ms a round).
    updates = [torch.empty(layout.numel, dtype=flat_dtype, device=device) for _ in group]
    starts = {} if start is not None else {key: w.to(device) for key, w in {id(r.w): r.w for r in group}.items()}
    sq_norms = torch.empty(len(group), dtype=flat_dtype, device=device)
    for i, (request, update) in enumerate(zip(group, updates)):
        for name, piece in zip(layout.names, torch.split(update, layout.sizes)):
            if name in low:
                low_rank.write_update(name, i, piece.view(shapes[name]))
            else:
                _write(piece.view(shapes[name]), params[name][i].detach(), bases.get(name))
        if start is None:
            update.sub_(starts[id(request.w)])
        torch.dot(update, update, out=sq_norms[i])
    # One transfer each for the losses, the norms and every momentum buffer, not one per
    # client: on a GPU each was a synchronisation per client.
    totals, norms = loss_sum.tolist(), sq_norms.tolist()
    held = {name: buf.cpu() for name, buf in buffers.items()} if carried else {}
    for i, request in enumerate(group):
        request.update, request.update_sq_norm = updates[i], norms[i]
        request.loss = totals[i] / max(len(steps), 1)
        for name, buf in held.items():
            request.buffers[name] = buf[i].clone(memory_format=torch.contiguous_format)


def _write(out: torch.Tensor, trained: torch.Tensor, start: torch.Tensor | None) -> None:
    """``trained`` (minus ``start``, when given) into ``out``, in one pass."""
    if start is None:
        out.copy_(trained)
    else:
        torch.sub(trained, start, out=out)


# A stacked parameter's gradient layout (strides), by parameter name and stacked shape, as the
# first step of an earlier cohort found it: later cohorts stack their parameters in it directly.
_GRADIENT_STRIDES: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}


def _stacked(name: str, chunks: tuple[torch.Tensor, ...], shape: tuple[int, ...], device: torch.device,
             gradient_layout: bool = True, shared: torch.Tensor | None = None) -> torch.Tensor:
    """The clients' flat chunks of one parameter stacked on a leading axis, in the layout its
    gradient is known to come in (``gradient_layout``) or the standard one. ``shared``: the
    chunk every client has, already on ``device`` (the round's one broadcast)."""
    size = (len(chunks), *shape)
    strides = _GRADIENT_STRIDES.get((name, size)) if gradient_layout else None
    out = torch.empty(size, dtype=chunks[0].dtype, device=device) if strides is None else \
        torch.empty_strided(size, strides, dtype=chunks[0].dtype, device=device)
    if shared is not None:
        # One copy of it, broadcast over the clients. On the CPU too it beat the copy per
        # client: 0.67 against 0.94-1.0 ms for the mlp's 50 x (200 x 784) weights.
        out.copy_(shared.view(shape).expand(size))
    else:
        for slot, chunk in zip(out, chunks):
            slot.copy_(chunk.reshape(shape))
    return out


def _adopt_gradient_layouts(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> bool:
    """Re-lay out parameters (and momentum buffers) whose gradients come in another memory
    layout: a vmapped Linear's weight gradient arrives transposed, and an elementwise update
    across layouts ran 13x slower (cnn4's 3136 x 512 layer, 50 clients: 317 ms against 24 ms
    per step). Values are unchanged; the layout is remembered for the next cohort. Returns
    whether any parameter moved."""
    moved = False
    for name, d in grads.items():
        if d.stride() != params[name].stride():
            _GRADIENT_STRIDES[name, tuple(d.shape)] = d.stride()
            params[name] = torch.empty_like(d).copy_(params[name]).requires_grad_()
            if name in buffers:
                buffers[name] = torch.empty_like(d).copy_(buffers[name])
            moved = True
    return moved


def prepare_process(rt: Runtime) -> None:
    """Make this process a cohort trainer: refuse a model it cannot train alike, keep freed memory."""
    check_model(rt.model)
    keep_large_allocations()


def call_as_cohort(rt: Runtime, app: ClientApp, messages: list[Message], contexts: dict[int, Context]) -> list[Message]:
    """The ClientApp's replies to ``messages`` (each to its node's context): the client rounds take
    turns, and their local training is done together by ``train_cohort``."""
    return _Turns().run([lambda m=msg: call_client_app(app, m, contexts[m.metadata.dst_node_id]) for msg in messages],
                        lambda requests: train_cohort(rt, requests))


class BatchedGrid(InlineGrid):
    """The inline Grid with each round's local training done by ``train_cohort``."""

    def __init__(self, cfg: DictConfig, run_id: int = 1) -> None:
        self.rt = get_runtime(cfg)
        prepare_process(self.rt)
        super().__init__(make_client_app(cfg), cfg.simulation.num_clients, run_id=run_id, store=state_store(cfg.simulation))

    def push_messages(self, messages: Any) -> list[str]:
        messages = list(messages)
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id}")
            self.assign_id(msg)
        replies = call_as_cohort(self.rt, self._app, messages, self._contexts)
        for msg, reply in zip(messages, replies):
            self._replies[msg.metadata.message_id] = reply
        return [msg.metadata.message_id for msg in messages]


class _Turns:
    """Runs jobs one at a time, each in a greenlet of its own on the calling thread: each job runs
    until it finishes or parks a training request; once all have, ``train`` serves the parked
    requests and the parked jobs resume in order.

    Greenlets rather than threads: everything then runs on one OS thread, so PyTorch's OpenMP
    pool is the run's own one team, as on the inline engine. A thread per client gave every
    client thread a team of its own (libgomp keeps one per calling thread), and with the many
    idle teams libgomp cut its spinning: the mlp's batched round took 1.3-1.9x as long
    (``benchmarks/scale.py``, ``benchmarks/NOTES.md``)."""

    def run(self, jobs: list, train) -> list[Message]:
        results: list[Message | None] = [None] * len(jobs)
        parked: list[tuple[greenlet, TrainingRequest]] = []
        set_parking(self._park)
        try:
            for i, job in enumerate(jobs):
                turn = greenlet(lambda i=i, job=job: results.__setitem__(i, job()))
                request = turn.switch()  # back here when it parks (with its request) or finishes (None)
                if not turn.dead:
                    parked.append((turn, request))
            failure = None
            if parked:
                try:
                    train([request for _, request in parked])
                except Exception as exc:  # noqa: BLE001 -- the cohort's clients fail their round, not the run
                    failure = exc
            for turn, _ in parked:
                turn.switch(failure)
        finally:
            set_parking(None)
        return results

    @staticmethod
    def _park(request: TrainingRequest) -> None:
        failure = greenlet.getcurrent().parent.switch(request)
        if failure is not None:
            raise RuntimeError(f"cohort training failed: {failure}") from failure


def run_batched(cfg: DictConfig, out_dir: str | Path, run_id: int = 1, resume: bool = False) -> dict[str, Any]:
    declare_server_task(run_id)
    client_threads(cfg.simulation)
    grid = BatchedGrid(cfg, run_id)
    try:
        return run_server(grid, cfg, out_dir, resume)
    finally:
        grid.close()
