"""One HGC client round (003_... Fig. 1, client side); see fl/hgc_strategy.py for the protocol.

Client state in its Flower Context: the model replica and its version, the predictor buffers,
the server-momentum velocity, the error-feedback memory and the round's mask (to read the next
downlink relay).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcomp.coding import decode_indices, encode_indices
from fedcomp.fl import messages as M
from fedcomp.fl.local import mean_gradient_sq_norm, train_local
from fedcomp.fl.runtime import Runtime
from fedcomp.hgc.codec import (
    Entry,
    aggregate_entries,
    decode_relay,
    decode_sync,
    encode_uplink,
    hgc_step,
    momentum_step,
)
from fedcomp.hgc.predictor import Predictor, xor_residue
from fedcomp.hgc.quantizer import dequantize_levels, quantize_levels


def _load(state: RecordDict, name: str, key: str) -> torch.Tensor | None:
    if name in state and key in state[name]:
        return torch.from_numpy(state[name][key].numpy().copy())
    return None


def synchronise(rec: ConfigRecord, state: RecordDict, predictor: Predictor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring the replica, the predictor and the server-momentum velocity to the server's
    version; return (replica, velocity)."""
    version = int(rec[M.VERSION])
    if rec[M.KIND] == M.FULL:
        w, buffers = decode_sync(rec[M.PAYLOAD])
        predictor.load_state(buffers)
        return w, buffers["velocity"]
    held = int(state[M.REPLICA_VERSION][M.VERSION]) if M.REPLICA_VERSION in state else None
    if held != version - 1:
        raise RuntimeError(f"HGC relay to version {version} sent to a client holding version {held}")
    w = _load(state, M.REPLICA, "w")
    d = w.numel()
    entries, weights, numel = decode_relay(rec[M.PAYLOAD])
    if numel != d:
        raise ValueError(f"HGC relay for d={numel}, the replica has d={d}")
    g = aggregate_entries(entries, weights, _load(state, M.HGC_STATE, "mask"), predictor, d)
    predictor.observe(g)
    velocity = _load(state, M.HGC_STATE, "velocity")
    velocity = momentum_step(g, velocity if velocity is not None else torch.zeros(d, dtype=torch.float64), float(rec["relay-momentum"]))
    return w + hgc_step(velocity, float(rec["server-lr"])), velocity


def hgc_round(rt: Runtime, msg: Message, state: RecordDict, partition_id: int, seed: int, training: dict) -> Message:
    rec = msg.content[M.HGC]
    predictor = Predictor(float(rec["beta"]), float(rec["eps"]))
    predictor.load_state({k: v for k in ("u", "v") if (v := _load(state, M.HGC_STATE, k)) is not None})
    w, velocity = synchronise(rec, state, predictor)
    d = w.numel()

    rt.layout.load(rt.model, w)
    indices = rt.client_indices(partition_id)
    start = time.perf_counter()
    loss = train_local(rt.model, rt.train.x, rt.train.y, indices, generator=torch.Generator().manual_seed(seed), **training)
    compute_s = time.perf_counter() - start

    memory = _load(state, M.HGC_STATE, "memory")
    update = rt.flat_model() - w
    grad_sq_norm = mean_gradient_sq_norm(update, len(indices), training)
    x = update + (memory if memory is not None else 0)
    phase, bits, k = rec["phase"], int(rec["bits"]), int(rec["k"])
    if phase == "member":
        mask = torch.from_numpy(decode_indices(rec["mask"], d))
    else:
        mask = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    symbols, levels = quantize_levels(x[mask], bits)
    memory = x.clone()
    memory[mask] -= dequantize_levels(symbols, levels)
    predictive = bool(rec["predictive"])
    if predictive:
        symbols = xor_residue(symbols, predictor.predicted_symbols(mask, bits))
    mask_blob = encode_indices(mask.numpy(), d) if phase != "member" else None
    payload = encode_uplink(Entry(bits, levels, symbols, predictive, mask_blob), d, bool(rec["deflate"]))

    state[M.REPLICA] = ArrayRecord({"w": w})
    state[M.REPLICA_VERSION] = ConfigRecord({M.VERSION: int(rec[M.VERSION])})
    state[M.HGC_STATE] = ArrayRecord({**predictor.state(), "velocity": velocity, "memory": memory, "mask": mask})
    metrics = MetricRecord({"num-examples": len(indices), "train-loss": loss, "compute-s": compute_s,
                            "partition-id": partition_id, "grad-sq-norm": grad_sq_norm})
    return Message(RecordDict({M.UP: ConfigRecord({M.PAYLOAD: payload}), M.METRICS: metrics}), reply_to=msg)
