"""HGCStrategy: the server side of Hybrid Gradient Compression (003_... Sec. 3, Fig. 1).

Round t, with the ratio k/d of the round (warm-up and LR-step adjustment of
``fedcomp.hgc.schedule``) applied to each sparse segment (``fedcomp.hgc.segments``):

1. Shared mask. ``mask_policy``:
   ``rotating`` (default) / ``largest`` -- one sampled client owns the mask: the round's
     sampled clients in turn, or the one with the most training samples (known from earlier
     replies; rotating until then). The server sends the owner its train message first; the
     owner trains, takes the top-k of its error-corrected update, and returns its payload
     with the Rice-coded mask (counted in its uplink). The server then relays the mask to the
     other sampled clients inside their train messages (counted in each one's downlink), and
     they sparsify on it. Simulated time: the members' transfers wait for the owner's.
   ``own`` -- every client sends its own top-k mask (no cross-client sharing); used to
     measure CR_c.
2. Clients quantize their masked values with q bits (Eq. 3, per segment), XOR the symbols
   with the prediction quantized the same way (Eq. 4; ``predictive``), range-code the residue,
   and keep what was lost in their error-feedback memory.
3. The server undoes the XOR with its mirror predictor, aggregates g~ = sum_i (n_i / n) x_i on
   the mask, applies w <- w + server_lr v with v <- server_momentum v + g~, and feeds g~ to
   its predictor.
4. Downlink (``broadcast``): ``relay`` -- the next train message of each client that took part
   carries the round's entries (without the shared mask), from which it rebuilds exactly g~;
   ``paper`` -- it carries g~ on the mask as deflated fp32, as the paper's server broadcasts
   (the server applies the same fp32-rounded g~). A client that missed a round first receives
   w and the predictor buffers in full (counted).

Sec. 3.2, dynamic ratio and momentum: for ``lr_step_window`` rounds before and after each
learning-rate step the ratio is ``lr_step_ratio`` (or ``lr_step_ratio_factor`` x ratio); when
the window ends, the clients clear their error-feedback memory and momentum buffers
(``reset_after_lr_step``, SOFF's ``clear_ef_buffer``) and their local momentum becomes
``momentum_after_lr_step`` (if set).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcomp.coding import encode_indices
from fedcomp.compression.selectors import budget
from fedcomp.fl import messages as M
from fedcomp.fl.strategy import CompressedFedAvg
from fedcomp.hgc.codec import (
    aggregate_entries,
    decode_uplink,
    encode_broadcast,
    encode_relay,
    encode_sync,
    entry_mask,
    hgc_step,
    momentum_step,
    on_mask,
)
from fedcomp.hgc.schedule import lr_step_adjusted_ratio, warmup_ratio
from fedcomp.hgc.settings import HGCSettings
from fedcomp.metrics import RoundStats
from fedcomp.models import StateLayout
from fedcomp.network import shared_mask_round_time

MASK_POLICIES = ("rotating", "largest", "own")


class HGCStrategy(CompressedFedAvg):
    def __init__(
        self, *, ratio: float = 0.001, bits: int = 1, warmup_rounds: int = 0, warmup_start: float = 0.25,
        mask_policy: str = "rotating", predictive: bool = True, beta: float = 0.9, beta2: float | None = None,
        eps: float = 1e-8, deflate: bool = False, scope: str = "model", exempt_first: int = 0, exempt_last: int = 0,
        broadcast: str = "relay", lr_step_window: int = 0, lr_step_ratio: float | None = None,
        lr_step_ratio_factor: float = 10.0, reset_after_lr_step: bool = True, server_momentum: float = 0.0,
        momentum_after_lr_step: float | None = None, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
        budget(1, ratio, None)
        if lr_step_ratio is not None:
            budget(1, lr_step_ratio, None)
        self.settings = HGCSettings(bits, predictive, deflate, beta, beta2, eps, scope, exempt_first, exempt_last, broadcast)
        self.ratio = ratio
        self.warmup_rounds, self.warmup_start = warmup_rounds, warmup_start
        self.mask_policy = mask_policy
        self.lr_step_window, self.lr_step_ratio, self.lr_step_ratio_factor = lr_step_window, lr_step_ratio, lr_step_ratio_factor
        self.reset_after_lr_step = reset_after_lr_step
        self.server_momentum, self.momentum_after_lr_step = server_momentum, momentum_after_lr_step
        self.velocity = torch.zeros(0, dtype=torch.float64)
        self.predictor = self.settings.predictor()
        self.segments = None
        self._sizes: dict[int, int] = {}  # node -> training samples, learnt from replies
        self._owner_reply: Message | None = None
        self._owner: int | None = None
        self._mask_blob: bytes | None = None

    def ratio_at(self, server_round: int, target: float | None = None) -> float:
        """The round's k/d: warm-up towards ``target`` (default ``ratio``), then the LR-step window."""
        r = warmup_ratio(server_round, self.ratio if target is None else target, self.warmup_rounds, self.warmup_start)
        if self.lr_step_ratio is not None:
            in_window = self.lr_step_window > 0 and any(abs(server_round - s) <= self.lr_step_window for s in self.schedule.lr_steps)
            return max(r, self.lr_step_ratio) if in_window else r
        return lr_step_adjusted_ratio(server_round, r, self.schedule.lr_steps, self.lr_step_window, self.lr_step_ratio_factor)

    def windows_ended(self, server_round: int) -> int:
        """How many LR-step windows (Sec. 3.2) have ended before this round."""
        return sum(server_round > s + self.lr_step_window for s in self.schedule.lr_steps)

    def local_momentum(self, server_round: int) -> float:
        """Sec. 3.2: once the window after a learning-rate step has passed, the clients' local
        momentum becomes ``momentum_after_lr_step`` (if set)."""
        if self.momentum_after_lr_step is not None and self.windows_ended(server_round):
            return self.momentum_after_lr_step
        return super().local_momentum(server_round)

    def resets_before(self, server_round: int) -> int:
        return self.windows_ended(server_round) if self.reset_after_lr_step and self.lr_step_window > 0 else 0

    def _sync_buffers(self) -> dict[str, torch.Tensor]:
        buffers = self.predictor.state() if self._version else {}
        if self.velocity.abs().sum() > 0:
            buffers["velocity"] = self.velocity
        return buffers

    def _pick_owner(self, nodes: list[int], server_round: int) -> int:
        if self.mask_policy == "largest" and all(n in self._sizes for n in nodes):
            return max(nodes, key=lambda n: (self._sizes[n], -n))
        return nodes[(server_round - 1) % len(nodes)]

    def _record(self, node_id: int, phase: str, ratio: float, mask: bytes | None) -> ConfigRecord:
        in_sync = self._in_sync(node_id)
        sync = self._pending if in_sync else encode_sync(self._global, self._sync_buffers())
        self._synced[node_id] = self._version
        rec = {
            **self.settings.record(), "phase": phase, "ratio": ratio, "server-lr": self.server_lr,
            "server-momentum": self.server_momentum, M.KIND: M.DELTA if in_sync else M.FULL, M.PAYLOAD: sync,
            M.VERSION: self._version,
        }
        if mask is not None:
            rec["mask"] = mask
        self._down_bytes[node_id] = len(sync) + (len(mask) if mask is not None else 0)
        return ConfigRecord(rec)

    def _message(self, node_id: int, record: ConfigRecord, config: ConfigRecord) -> Message:
        return Message(RecordDict({M.HGC: record, M.CONFIG: config}), dst_node_id=node_id, message_type=MessageType.TRAIN)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._state = arrays.to_torch_state_dict()
        if self._layout is None:
            self._layout = StateLayout.of(self._state)
            self._global = self._layout.flatten(self._state)
            self.segments = self.settings.segments(self._layout.sizes)
            self.predictor.reset(self._global.numel())
            self.velocity = torch.zeros(self._global.numel(), dtype=torch.float64)
        config = self.round_config(config, server_round)
        nodes = self.sample(list(grid.get_node_ids()), server_round)
        # One shared mask serves every client, so per-client ratios from a controller cannot
        # apply one by one: the mask gets the mean of the sampled clients' ratios.
        ratios = self.client_ratios(nodes, server_round, grid)
        ratio = self.ratio_at(server_round, float(np.mean(list(ratios.values()))) if ratios else None)
        self._ratios = {n: ratio for n in nodes}
        self._owner_reply, self._owner, self._mask_blob = None, None, None
        if self.mask_policy == "own":
            return [self._message(n, self._record(n, "own", ratio, None), config) for n in nodes]
        self._owner = self._pick_owner(nodes, server_round)
        # Phase 1: the owner computes the mask; its reply also carries its own payload.
        owner_msg = self._message(self._owner, self._record(self._owner, "owner", ratio, None), config)
        (self._owner_reply,) = grid.send_and_receive([owner_msg])
        if self._owner_reply.has_error():
            raise RuntimeError(f"mask owner {self._owner} failed: {self._owner_reply.error.reason}")
        entry, _ = decode_uplink(self._owner_reply.content[M.UP][M.PAYLOAD])
        self._mask_blob = entry.mask_blob
        # Phase 2: everyone else, with the mask relayed.
        return [self._message(n, self._record(n, "member", ratio, self._mask_blob), config)
                for n in nodes if n != self._owner]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ([self._owner_reply] if self._owner_reply is not None else []) + list(replies)
        replies.sort(key=lambda r: r.metadata.src_node_id)  # one fixed aggregation order
        d = self._global.numel()
        stats = RoundStats(server_round)
        entries, sizes = [], []
        shared = None
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"client on node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            payload = reply.content[M.UP][M.PAYLOAD]
            entry, numel = decode_uplink(payload)
            if numel != d:
                raise ValueError(f"HGC payload for d={numel}, the model has d={d}")
            if entry.mask_blob is not None and self.mask_policy != "own":
                shared = entry_mask(entry, None, d)
            entries.append(entry)
            stats.clients.append(self.client_round(reply, len(payload)))
            sizes.append(stats.clients[-1].num_examples)
            self._sizes[reply.metadata.src_node_id] = sizes[-1]
        if not entries:
            raise RuntimeError(f"round {server_round}: no client replied")
        weights = np.asarray(sizes, dtype=np.float32) / np.float32(sum(sizes))
        g, union = aggregate_entries(entries, weights, shared, self.predictor, self.segments)
        if self.settings.broadcast == "paper":
            values = g[union].float()
            g = on_mask(values, union, d)
            own_mask = encode_indices(union.numpy(), d) if shared is None else None
            self._pending = encode_broadcast(values, d, own_mask)
        else:
            self._pending = encode_relay(entries, weights.tolist(), d, self.settings.deflate, keep_masks=shared is None)
        self.history.update_norms.append(float(g.norm()))
        self.history.grad_sq_norms.append(stats.grad_sq_norm)
        self.velocity = momentum_step(g, self.velocity, self.server_momentum)
        self._global += hgc_step(self.velocity, self.server_lr)
        self.predictor.observe(g, union)
        self._version += 1
        stats.sim_time_s = self._round_time(stats, replies)
        self.rounds[server_round] = stats
        self._layout.load(self._state, self._global)
        return ArrayRecord(self._state), MetricRecord({"train-loss": stats.train_loss, "num-examples": sum(sizes)})

    def _round_time(self, stats: RoundStats, replies: list[Message]) -> float:
        """Members train while the owner works, but compress only once the mask, relayed after
        the owner's upload, has reached them (own masks: a plain synchronous round)."""
        if self._owner is None:
            return self.round_time(stats)
        net = self.network

        def party(c):
            return net.links[c.partition_id], c.bytes_up, c.bytes_down, c.compute_s

        by_node = {r.metadata.src_node_id: c for c, r in zip(stats.clients, replies)}
        owner = by_node.pop(self._owner)
        return shared_mask_round_time(party(owner), [party(c) for c in by_node.values()], len(self._mask_blob or b""), net.compute_scale)
