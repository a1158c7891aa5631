"""One HGC client round (003_... Fig. 1, client side); see fl/hgc_strategy.py for the protocol.

Client state (``fedcomp.fl.client_state``): the model replica and its version, the predictor
buffers, the server-momentum velocity and the round's mask (to read the next downlink) in
HGC_STATE; the error-feedback memory in UP_STATE and the local optimizer's momentum in
OPT_STATE, like every other client (so the Sec. 3.2 reset clears them the same way).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, Message

from fedcomp.coding import decode_indices, encode_indices
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


def hgc_round(rt: Runtime, msg: Message, state: ClientState, partition_id: int, seed: int) -> Message:
    rec, config = msg.content[M.HGC], msg.content[M.CONFIG]
    if rt.seal is not None:  # the server tags the payload and the relayed mask together
        rt.seal.check(rec[M.PAYLOAD] + rec.get("mask", b""), rec.get(M.TAG))
    settings = HGCSettings.from_record(rec)
    segments = settings.segments(rt.layout.sizes)
    predictor = settings.predictor()
    predictor.load_state(state.get(M.HGC_STATE) or {})
    start = time.perf_counter()
    w, velocity = synchronise(rec, state, predictor, segments)
    decode_s = time.perf_counter() - start
    d = w.numel()

    result = train_round(rt, w, state, partition_id, seed, config, msg.content.get(M.EXTRA))
    start = time.perf_counter()
    memory = state.tensor(M.UP_STATE, "residual")
    x = result.update + (memory if memory is not None else 0)
    phase = rec["phase"]
    mask = torch.from_numpy(decode_indices(rec["mask"], d)) if phase == "member" else segments.select(x, float(rec["ratio"]))
    cuts = segments.cuts(mask)
    symbols, levels = quantize_segments(x[mask], cuts, settings.bits)
    memory = x.clone()
    memory[mask] -= dequantize_segments(symbols, levels, cuts)
    if settings.predictive:
        symbols = xor_residue(symbols, predictor.predicted_symbols(mask, settings.bits, cuts))
    mask_blob = encode_indices(mask.numpy(), d) if phase != "member" else None
    payload = encode_uplink(Entry.coded(settings.bits, levels, symbols, settings.predictive, mask_blob, settings.deflate), d)
    encode_s = time.perf_counter() - start

    state.put(M.REPLICA, {"w": w})
    state.set_number(M.REPLICA_VERSION, int(rec[M.VERSION]))
    state.put(M.HGC_STATE, {**predictor.state(), "velocity": velocity, "mask": mask})
    state.put(M.UP_STATE, {"residual": memory})
    return reply(rt, msg, payload, result, partition_id, encode_s, decode_s)
