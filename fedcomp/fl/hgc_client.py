"""One HGC client round (003_... Fig. 1, client side); see fl/hgc_strategy.py for the protocol.

Client state (``fedcomp.fl.client_state``): the model replica and its version, the predictor
buffers, the server-momentum velocity and the round's mask (to read the next downlink) in
HGC_STATE; the error-feedback memory in UP_STATE and the local optimizer's momentum in
OPT_STATE, like every other client (so the Sec. 3.2 reset clears them the same way).

Synchronisation is shared within a process (``SharedSync``): clients holding the same version
hold the same tensors and receive the same downlink, so the first of them rebuilds the relayed
aggregate and the others take its result -- work and memory once per version, not per client.
"""

from __future__ import annotations

import functools
import time
from collections import deque

import torch
from flwr.app import ConfigRecord, Message

from fedcomp import vectors
from fedcomp.coding import decode_indices, encode_indices
from fedcomp.compression.base import check_finite
from fedcomp.fl import messages as M
from fedcomp.fl.client_round import reply, train_round
from fedcomp.fl.client_state import ClientState
from fedcomp.fl.runtime import Runtime
from fedcomp.hgc.codec import (
    Entry,
    aggregate_entries,
    decode_broadcast,
    decode_relay,
    decode_sync,
    encode_uplink,
    hgc_step,
    momentum_step,
    on_mask,
)
from fedcomp.hgc.predictor import Predictor, xor_residue
from fedcomp.hgc.quantizer import dequantize_segments, quantize_segments
from fedcomp.hgc.segments import Segments
from fedcomp.hgc.settings import HGCSettings
from fedcomp.models import StateLayout

# Record fields that are not inputs of ``synchronise`` (this round's instructions, and the tag,
# checked before).
_ROUND_FIELDS = frozenset(("phase", "ratio", "mask", M.TAG))


class SharedSync:
    """Synchronisation results of this process's clients, for reuse. ``synchronise`` is a pure
    function of the downlink record and the client's held replica, predictor buffers, velocity
    and mask, none of which is ever changed in place. A client whose record equals an earlier
    client's, whose held dense tensors are that client's (same storage, kept alive here) and
    whose mask and predictor scales are equal (O(k) to compare, or the same tensor) gets
    that client's result, the same tensors. Anyone else (a client that missed rounds, an engine
    that serialises state) computes its own."""

    def __init__(self, size: int = 4) -> None:
        self._entries: deque[tuple[tuple, tuple, tuple]] = deque(maxlen=size)

    @staticmethod
    def _same_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return a is b
        return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)

    @classmethod
    def _matches(cls, sources: tuple, held: tuple) -> bool:
        if len(sources) != len(held):
            return False
        if not held:
            return True
        (*dense_a, scale_a, mask_a), (*dense_b, scale_b, mask_b) = sources, held
        return cls._equal(scale_a, scale_b) and cls._equal(mask_a, mask_b) and all(map(cls._same_storage, dense_a, dense_b))

    @staticmethod
    def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return a is b or (a is not None and b is not None and torch.equal(a, b))

    def get(self, record: tuple, held: tuple) -> tuple | None:
        for rec, sources, result in self._entries:
            if rec == record and self._matches(sources, held):
                return result
        return None

    def put(self, record: tuple, held: tuple, result: tuple) -> None:
        self._entries.append((record, held, result))


_SHARED = SharedSync()


def sync_key(rec: ConfigRecord, state: ClientState) -> tuple:
    """What ``synchronise``'s result depends on besides the held tensors: the record's inputs
    and, for a relay, the version the client holds. A full resync replaces everything the client
    held, so every client resyncing to a version shares one decode whatever it held before (with
    partial participation most of a round's clients are stale, each from its own version)."""
    held = state.number(M.REPLICA_VERSION) if rec[M.KIND] != M.FULL else None
    return (held, *sorted((k, v) for k, v in rec.items() if k not in _ROUND_FIELDS))


def held_tensors(rec: ConfigRecord, state: ClientState) -> tuple:
    """The client-held tensors ``synchronise`` reads: the dense ones, then the predictor's
    scales and the mask (none for a full resync)."""
    if rec[M.KIND] == M.FULL:
        return ()
    buffers = state.get(M.HGC_STATE) or {}
    return (state.tensor(M.REPLICA, "w"), *(buffers.get(k) for k in ("u", "v", "velocity", "scale", "mask")))


def synchronise(rec: ConfigRecord, state: ClientState, predictor: Predictor, segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring the replica, the predictor and the server-momentum velocity to the server's
    version; return (replica, velocity)."""
    version, d = int(rec[M.VERSION]), segments.numel
    if rec[M.KIND] == M.FULL:
        w, buffers = decode_sync(rec[M.PAYLOAD], d)
        predictor.load_state(buffers)
        return w, buffers["velocity"]
    held = state.number(M.REPLICA_VERSION)
    if held != version - 1:
        raise RuntimeError(f"HGC relay to version {version} sent to a client holding version {held}")
    w = state.tensor(M.REPLICA, "w")
    buffers = state.get(M.HGC_STATE) or {}
    mask = buffers.get("mask")
    if rec["broadcast"] == "paper":
        union, values, _ = decode_broadcast(rec[M.PAYLOAD], mask, d)
        g = on_mask(values, union, d)
    else:
        entries, weights, _ = decode_relay(rec[M.PAYLOAD], d)
        g, union = aggregate_entries(entries, weights, mask, predictor, segments)
    predictor.observe(g, union)
    velocity = buffers.get("velocity", torch.zeros(d, dtype=torch.float64))
    velocity = momentum_step(g, velocity, float(rec["server-momentum"]))
    return w + hgc_step(velocity, float(rec["server-lr"])), velocity


@functools.lru_cache(maxsize=2)
def relayed_mask(blob: bytes, d: int) -> torch.Tensor:
    """A round's relayed mask, decoded once per process: every member of the round gets the same
    bytes, and so the same tensor (only ever read), which also lets a shared predictor's memo
    serve them all. Decoding it took about 150 us a member for the mlp at 0.1%."""
    return torch.from_numpy(decode_indices(blob, d))


def masked_momentum(buffers: dict[str, torch.Tensor], layout: StateLayout, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The local optimizer's momentum buffers (parameter name -> buffer) with the coordinates of
    ``mask`` (flat, sorted, in ``layout`` order) cleared: what was sent stops being pushed again
    through error feedback (DGC's momentum factor masking)."""
    tensors = Segments.of(layout.sizes, scope="layerwise")
    cuts = tensors.cuts(mask)
    out = dict(buffers)
    for name, lo, a, b in zip(layout.names, tensors.bounds, cuts, cuts[1:]):
        if name in out and b > a:
            flat = out[name].reshape(-1).clone()
            flat[mask[a:b] - int(lo)] = 0
            out[name] = flat.view_as(out[name])
    return out


def encode_update(update: torch.Tensor, memory: torch.Tensor | None, shared_mask: torch.Tensor | None, ratio: float,
                  settings: HGCSettings, segments: Segments, predictor: Predictor) -> tuple[bytes, torch.Tensor, torch.Tensor]:
    """The client's uplink (Fig. 1): error feedback, the mask (the round's shared one, or this
    client's top-k as the round's owner), Eq. 3 levels and the XOR residue against the Eq. 4
    prediction. Returns (payload, mask on the CPU, new error-feedback memory on the update's
    device). ``update`` is handed over (``Compressor.compress_donated``): the new memory is
    built in its storage.

    Error feedback, the top-k and the residual run where ``update`` lives (the training device);
    only the k chosen values and indices move to the CPU to be quantized, predicted and coded.
    Eq. 3's level means are float64 sums in one fixed order there, and every device-side step is
    one IEEE float32 operation per coordinate, so the payload is the CPU path's byte for byte."""
    x = vectors.add_(update, memory.to(update.device) if memory is not None else 0.0)
    # Before anything is kept: a diverged client fails its round with its state as it was, as
    # every other compressor's client does, instead of keeping a NaN residual for good.
    check_finite(x)
    on_device = segments.select(x, ratio) if shared_mask is None else shared_mask.to(x.device)
    mask = on_device.cpu()
    cuts = segments.cuts(mask)
    symbols, levels = quantize_segments(x[on_device].cpu(), cuts, settings.bits)
    # The new memory is x itself, updated in place: the masked values were copied out above
    # (as error feedback does; a clone cost a d-sized pass).
    memory = x
    memory[on_device] -= dequantize_segments(symbols, levels, cuts).to(x.device)
    if settings.predictive:
        symbols = xor_residue(symbols, predictor.predicted_symbols(mask, settings.bits, cuts))
    mask_blob = encode_indices(mask.numpy(), segments.numel) if shared_mask is None else None
    entry = Entry.coded(settings.bits, levels, symbols, settings.predictive, mask_blob, settings.deflate)
    return encode_uplink(entry, segments.numel), mask, memory


def hgc_round(rt: Runtime, msg: Message, state: ClientState, partition_id: int, seed: int) -> Message:
    rec, config = msg.content[M.HGC], msg.content[M.CONFIG]
    if rt.seal is not None:  # the server tags the payload and the relayed mask together
        rt.seal.check(rec[M.PAYLOAD] + rec.get("mask", b""), rec.get(M.TAG))
    settings = HGCSettings.from_record(rec)
    segments = settings.segments(rt.layout.sizes)
    start = time.perf_counter()
    key = sync_key(rec, state)
    held = held_tensors(rec, state)
    if (shared := _SHARED.get(key, held)) is not None:
        # The earlier client's predictor itself (nothing changes it after its synchronisation):
        # with the round's one relayed mask it predicts once for all of them (its memo).
        w, velocity, predictor = shared
    else:
        predictor = settings.predictor()
        predictor.load_state(state.get(M.HGC_STATE) or {})
        w, velocity = synchronise(rec, state, predictor, segments)
        _SHARED.put(key, held, (w, velocity, predictor))
    decode_s = time.perf_counter() - start

    result = train_round(rt, w, state, partition_id, seed, config, msg.content.get(M.EXTRA))
    start = time.perf_counter()
    shared_mask = relayed_mask(rec["mask"], segments.numel) if rec["phase"] == "member" else None
    payload, mask, memory = encode_update(result.update, state.tensor(M.UP_STATE, "residual"), shared_mask, float(rec["ratio"]),
                                          settings, segments, predictor)
    encode_s = time.perf_counter() - start

    if settings.momentum_masking and (buffers := state.get(M.OPT_STATE)):
        state.put(M.OPT_STATE, masked_momentum(buffers, rt.layout, mask))

    state.put(M.REPLICA, {"w": w})
    state.set_number(M.REPLICA_VERSION, int(rec[M.VERSION]))
    state.put(M.HGC_STATE, {**predictor.state(), "velocity": velocity, "mask": mask})
    state.put(M.UP_STATE, {"residual": memory})
    return reply(rt, msg, payload, result, partition_id, encode_s, decode_s)
