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
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedcomp.coding import encode_indices
from fedcomp.compression.selectors import budget
from fedcomp.config.schema import ConfigError
from fedcomp.fl import messages as M
from fedcomp.fl.strategy import Arrival, ClientFault, CompressedFedAvg
from fedcomp.hgc.codec import (
    aggregate,
    decode_uplink,
    encode_broadcast,
    encode_relay,
    encode_sync,
    entry_mask,
    entry_values,
    hgc_step,
    momentum_step,
    on_mask,
)
from fedcomp.hgc.schedule import lr_step_adjusted_ratio, warmup_ratio
from fedcomp.hgc.settings import HGCSettings
from fedcomp.metrics import RoundStats
from fedcomp.wire import PayloadError

MASK_POLICIES = ("rotating", "largest", "own")


class HGCStrategy(CompressedFedAvg):
    def __init__(
        self, *, ratio: float = 0.001, bits: int = 1, warmup_rounds: int = 0, warmup_start: float = 0.25,
        mask_policy: str = "rotating", predictive: bool = True, beta: float = 0.9, beta2: float | None = None,
        eps: float = 1e-8, deflate: bool = False, scope: str = "model", exempt_first: int = 0, exempt_last: int = 0,
        broadcast: str = "relay", lr_step_window: int = 0, lr_step_ratio: float | None = None,
        lr_step_ratio_factor: float = 10.0, reset_after_lr_step: bool = True, server_momentum: float = 0.0,
        momentum_after_lr_step: float | None = None, momentum_masking: bool = False, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
        if self.policy.kind == "async":
            raise ValueError("HGC's shared mask and predictor are synchronous: round=async is not defined for it")
        budget(1, ratio, None)
        if lr_step_ratio is not None:
            budget(1, lr_step_ratio, None)
        self.settings = HGCSettings(
            bits, predictive, deflate, beta, beta2, eps, scope, exempt_first, exempt_last, broadcast, momentum_masking
        )
        self.ratio = ratio
        self.warmup_rounds, self.warmup_start = warmup_rounds, warmup_start
        self.mask_policy = mask_policy
        self.lr_step_window, self.lr_step_ratio, self.lr_step_ratio_factor = lr_step_window, lr_step_ratio, lr_step_ratio_factor
        self.reset_after_lr_step = reset_after_lr_step
        self.server_momentum, self.momentum_after_lr_step = server_momentum, momentum_after_lr_step
        self.velocity = torch.zeros(0, dtype=torch.float64)
        self.predictor = self.settings.predictor()
        self.segments = None
        self._owner: int | None = None
        self._owner_arrival: Arrival | None = None
        self._shared: torch.Tensor | None = None  # the round's shared mask, once the owner's payload is in
        self._phase1: set[int] = set()  # nodes asked to own this round's mask
        self._sync_cache: tuple[int, bytes] | None = None  # (version, resync payload)

    @classmethod
    def check_params(cls, params: dict, cfg, sizes: list[int]) -> None:
        super().check_params(params, cfg, sizes)
        if params.get("round") == "async":
            raise ConfigError("strategy.round: HGC's shared mask and predictor are synchronous; async is not defined for it")
        if params.get("mask_policy", "rotating") not in MASK_POLICIES:
            raise ConfigError(f"strategy.mask_policy: must be one of {MASK_POLICIES} (got {params['mask_policy']!r})")
        for key in ("ratio", "lr_step_ratio", "warmup_start"):
            value = params.get(key)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"strategy.{key}: must be in (0, 1] (got {value})")
        if params.get("exempt_first", 0) + params.get("exempt_last", 0) > len(sizes):
            raise ConfigError(f"strategy.exempt_first: with exempt_last exceeds the model's {len(sizes)} tensors")
        fields = {k: params[k] for k in HGCSettings.__dataclass_fields__ if k in params}
        try:
            HGCSettings(**fields)
        except ValueError as exc:
            key = next((k for k in fields if k in str(exc)), "bits")
            raise ConfigError(f"strategy.{key}: {exc}") from None
        if cfg.compressor.up.name != "identity" or cfg.compressor.down.name != "identity":
            raise ConfigError(f"compressor: strategy=hgc codes both directions itself; use compressor=none "
                              f"(got compressor.up.name={cfg.compressor.up.name})")

    def on_setup(self) -> None:
        self.segments = self.settings.segments(self._layout.sizes)
        self.predictor.reset(self.d)
        self.velocity = torch.zeros(self.d, dtype=torch.float64)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict()
        return tensors | {f"predictor.{k}": v for k, v in self.predictor.state().items()} | {"velocity": self.velocity}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state_dict(tensors, meta)
        self.predictor.load_state({k[10:]: v.clone() for k, v in tensors.items() if k.startswith("predictor.")})
        self.velocity = tensors["velocity"].clone()
        self._sync_cache = None

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
        """What a resync carries besides the model: the predictor's buffers in float64 (the
        precision both ends compute them in, so they stay bit-identical) once there are any,
        and the server-momentum velocity only when server momentum is used."""
        buffers = self.predictor.state() if self._version and self.settings.predictive else {}
        if self.server_momentum:
            buffers["velocity"] = self.velocity
        return buffers

    def _sync_payload(self) -> bytes:
        """The current version's resync (model and predictor), encoded once for every client
        that needs it: one object, not one copy per client, however many are out of sync."""
        if self._sync_cache is None or self._sync_cache[0] != self._version:
            self._sync_cache = (self._version, encode_sync(self._global, self._sync_buffers()))
        return self._sync_cache[1]

    def held_update(self, payload: bytes, update: tuple) -> tuple:
        return update  # entries are sparse already

    def _pick_owner(self, nodes: list[int], server_round: int) -> int:
        if self.mask_policy == "largest" and self.sizes.size:
            return max(nodes, key=lambda n: (self.sizes[self.partition(n)], -n))
        return nodes[(server_round - 1) % len(nodes)]

    def _record(self, node_id: int, phase: str, ratio: float, mask: bytes | None) -> ConfigRecord:
        in_sync = self._in_sync(node_id)
        sync = self._pending if in_sync else self._sync_payload()
        rec = {
            **self.settings.record(), "phase": phase, "ratio": ratio, "server-lr": self.server_lr,
            "server-momentum": self.server_momentum, M.KIND: M.DELTA if in_sync else M.FULL, M.PAYLOAD: sync,
            M.VERSION: self._version,
        }
        if mask is not None:
            rec["mask"] = mask
        if self.seal is not None:  # one tag over everything the record carries as bytes
            rec[M.TAG] = self.seal.tag(sync + (mask or b""))
        return ConfigRecord(rec)

    def _dispatch(self, node: int, phase: str, ratio: float, config: ConfigRecord, server_round: int, mask: bytes | None = None) -> Message | None:
        record = self._record(node, phase, ratio, mask)
        return self.dispatch(node, {M.HGC: record, M.CONFIG: config}, server_round, M.HGC, len(mask or b""))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.begin_round()
        nodes, self._k = self.cohort(grid, server_round)
        # One shared mask serves every client, so per-client ratios from a controller cannot
        # apply one by one: the mask gets the mean of the sampled clients' ratios.
        ratios = self.client_ratios(nodes, server_round)
        ratio = self.ratio_at(server_round, float(np.mean(list(ratios.values()))) if ratios else None)
        self._ratios = {n: ratio for n in nodes}
        config = self.round_config(config, server_round)
        self._owner, self._owner_arrival, self._shared, self._phase1 = None, None, None, set()
        if self.mask_policy == "own":
            return [m for n in nodes if (m := self._dispatch(n, "own", ratio, config, server_round)) is not None]
        # Phase 1: the owner computes the mask; its reply also carries its own payload. An owner
        # that drops out or fails is replaced by the next sampled client (its traffic counted).
        remaining = list(nodes)
        self._phase1 = set()
        while remaining and self._owner is None:
            owner = self._pick_owner(remaining, server_round)
            remaining.remove(owner)
            self._phase1.add(owner)
            msg = self._dispatch(owner, "owner", ratio, config, server_round)
            if msg is None:
                continue
            arrivals = self.receive(grid.send_and_receive([msg], timeout=self.timeout), expected=[owner])
            if arrivals:
                self._owner, self._owner_arrival = owner, arrivals[0]
        if self._owner is None:
            return []
        mask_blob = encode_indices(self._shared.numpy(), self.d)
        # Phase 2: everyone else, with the mask relayed.
        return [m for n in remaining if (m := self._dispatch(n, "member", ratio, config, server_round, mask_blob)) is not None]

    def decode_update(self, payload: bytes) -> tuple[object, torch.Tensor, torch.Tensor]:
        """(entry, mask, values): the entry decoded against the server's predictor; an owner's
        mask becomes the round's shared mask, a member may not bring its own."""
        try:
            entry, _ = decode_uplink(payload, self.d)
            if self.mask_policy != "own" and self._shared is not None and entry.mask_blob is not None:
                raise ClientFault("a member's entry carries its own mask")
            if self.mask_policy == "own" and entry.mask_blob is None:
                raise ClientFault("entry lacks its mask (own masks)")
            mask = entry_mask(entry, self._shared, self.d)
            values = entry_values(entry, mask, self.predictor, self.segments)
        except PayloadError as exc:
            raise ClientFault(f"undecodable HGC entry: {exc}") from None
        if self.mask_policy != "own" and self._shared is None:
            self._shared = mask
        return entry, mask, values

    def timelines(self, arrivals: list[Arrival]) -> None:
        """Members train while the owner works, but compress only once the mask, relayed after
        the owner's upload, has reached them (own masks: every client on its own)."""
        start = self._round_start + self._downlink_encode_s()
        for a in arrivals:
            if a.node == self._owner or self._owner is None:
                a.timeline = self.system.timeline(a.work, start)
        mask_ready = self._owner_arrival.timeline.uploaded if self._owner_arrival is not None else None
        for a in arrivals:
            if a.timeline is None:
                a.timeline = self.system.timeline(a.work, start, mask_ready, self._sent[a.node].mask_bytes)

    def round_arrivals(self, replies: Iterable[Message]) -> list[Arrival]:
        phase2 = [n for n in self._sent if n not in self._phase1]
        return ([self._owner_arrival] if self._owner_arrival is not None else []) + self.receive(replies, expected=phase2)

    def aggregate(self, stats: RoundStats, accepted: list[Arrival], weight=None) -> None:
        """g~ = sum_i (n_i / n) x_i over the accepted entries in node order (the order every
        client reproduces from the relay), then the server step and the predictor."""
        accepted = sorted(accepted, key=lambda a: a.node)
        d = self.d
        sizes = np.asarray([a.client.num_examples for a in accepted], dtype=np.float32)
        weights = sizes / np.float32(sizes.sum())
        g = aggregate([(mask, values) for _, mask, values in (a.update for a in accepted)], weights, d)
        union = self._shared if self._shared is not None else torch.unique(torch.cat([a.update[1] for a in accepted]))
        entries = [a.update[0] for a in accepted]
        if self.settings.broadcast == "paper":
            values = g[union].float()
            g = on_mask(values, union, d)
            self._pending = encode_broadcast(values, d, encode_indices(union.numpy(), d) if self._shared is None else None)
        else:
            self._pending = encode_relay(entries, weights.tolist(), d, keep_masks=self._shared is None)
        self.record_history(g, accepted)
        self.velocity = momentum_step(g, self.velocity, self.server_momentum)
        self._global += hgc_step(self.velocity, self.server_lr)
        self.predictor.observe(g, union)
        self._version += 1
