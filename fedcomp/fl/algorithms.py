"""Client algorithms: what a client does beyond plain local SGD (``client=...``).

A ``ClientAlgorithm`` is one object on the server and one per client process. On the client it
may correct every gradient during local training (``grad_hook``) and send extra payloads with
its update (``client_extras``); on the server it may send extra payloads with each train
message (``server_extras``) and fold the clients' extras in after aggregation
(``server_update``). Extra payloads are real encoded bytes, counted with the payload they
travel beside; per-client state lives in the client's state store like error feedback.

  ``fedavg``    nothing beyond local SGD
  ``fedprox``   Li et al. 2020: the proximal term mu/2 ||w - w_global||^2, i.e. each gradient
                gains mu (w - w_global) -- the combination the HGC paper's Fig. 3 runs
  ``scaffold``  Karimireddy et al. 2020 (option II): each gradient is corrected by c - c_i; after
                K local steps of rate lr, c_i+ = c_i - c + (w_global - w) / (K lr); the client sends
                dc_i = c_i+ - c_i (fp32), the server sends c (fp32) and sets c <- c + (|S| / N)
                mean(dc_i). Both directions double the dense traffic they add, and it is counted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedcomp.compression import build
from fedcomp.fl import messages as M
from fedcomp.vectors import all_finite
from fedcomp.wire import PayloadError

CONTROL = "control"  # SCAFFOLD's c (down) and dc_i (up)


class ClientAlgorithm:
    """Plain local SGD; subclasses add to it."""

    def grad_hook(self, model: nn.Module, layout, w_global: torch.Tensor, state, extras: dict[str, torch.Tensor]) -> Callable[[nn.Module], None] | None:
        """Called before local training; the returned function runs after every backward pass."""
        return None

    def client_extras(self, update: torch.Tensor, state, extras: dict[str, torch.Tensor], steps: int, lr: float) -> dict[str, torch.Tensor]:
        """Tensors to send up beside the update (after local training). ``update`` is lent, on
        the CPU: the uplink compressor takes it over after this call and may overwrite it
        (``Compressor.compress_donated``), so keep a copy of anything derived from it, never
        the tensor itself."""
        return {}

    def server_extras(self, d: int) -> dict[str, torch.Tensor]:
        """Tensors to send down with this round's train messages."""
        return {}

    def server_update(self, extras: list[dict[str, torch.Tensor]], num_clients: int) -> None:
        """Fold in the accepted clients' extras after the round's aggregation."""

    def state(self) -> dict[str, torch.Tensor]:
        """The server side's tensors (checkpoints)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    # -- the wire: every extra an fp32 payload, decoded against the model's length --------------

    _codec = build("identity")

    @classmethod
    def encode(cls, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
        return {name: cls._codec.compress(t.float()) for name, t in tensors.items()}

    @classmethod
    def decode(cls, record, d: int) -> dict[str, torch.Tensor]:
        """Extras from a record: fp32 vectors of length d, finite, else PayloadError."""
        out = {}
        for name, payload in (record or {}).items():
            value = cls._codec.decompress(payload, (d,), torch.float32)
            if not all_finite(value):
                raise PayloadError(f"extra {name!r} has NaN/Inf entries")
            out[name] = value
        return out


class FedProx(ClientAlgorithm):
    def __init__(self, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def grad_hook(self, model, layout, w_global, state, extras):
        anchors = [t.to(p.device) for t, p in zip(per_parameter(w_global, model, layout), model.parameters())]

        def proximal(m: nn.Module) -> None:
            with torch.no_grad():
                for p, w0 in zip(m.parameters(), anchors):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - w0, alpha=self.mu)
        return proximal


class Scaffold(ClientAlgorithm):
    def __init__(self) -> None:
        self.c = torch.zeros(0)  # the server's control variate

    def grad_hook(self, model, layout, w_global, state, extras):
        c_i = state.tensor(M.ALGO_STATE, "c_i")
        c = extras.get(CONTROL, torch.zeros(w_global.numel()))
        correction = c - (c_i if c_i is not None else torch.zeros_like(c))
        parts = [t.to(p.device) for t, p in zip(per_parameter(correction, model, layout), model.parameters())]

        def corrected(m: nn.Module) -> None:
            with torch.no_grad():
                for p, delta in zip(m.parameters(), parts):
                    if p.grad is not None:
                        p.grad.add_(delta)
        return corrected

    def client_extras(self, update, state, extras, steps, lr):
        c = extras.get(CONTROL, torch.zeros_like(update))
        c_i = state.tensor(M.ALGO_STATE, "c_i")
        c_i = c_i if c_i is not None else torch.zeros_like(update)
        new = c_i - c - update / (steps * lr)  # option II: (w_global - w) / (K lr) = -update / (K lr)
        state.put(M.ALGO_STATE, {"c_i": new})
        return {CONTROL: new - c_i}

    def server_extras(self, d):
        if self.c.numel() != d:
            self.c = torch.zeros(d)
        return {CONTROL: self.c}

    def state(self):
        return {"c": self.c}

    def load_state(self, state):
        self.c = state.get("c", torch.zeros(0))

    def server_update(self, extras, num_clients):
        if extras:
            self.c = self.c + len(extras) / num_clients * torch.stack([e[CONTROL] for e in extras]).mean(0)


def per_parameter(flat: torch.Tensor, model: nn.Module, layout) -> list[torch.Tensor]:
    """The parts of a flat layout vector that sit on the model's parameters, in
    ``model.parameters()`` order and shape (float buffers such as batch-norm statistics skipped)."""
    views = dict(zip(layout.names, torch.split(flat, layout.sizes)))
    return [views[name].view(p.shape) for name, p in model.named_parameters()]
