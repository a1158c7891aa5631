"""Injected client faults (``simulation.faults``), to test what a run survives.

Each entry names a fault, the partitions it hits and the rounds (all when null):

  ``crash``        the client raises instead of training (an error reply)
  ``lose_down``    the train message never reaches the client (no reply; client state untouched)
  ``lose``         the client trains, then its reply is lost (client state moved; no reply)
  ``corrupt``      bytes of the uplink payload change in transit, the frame's CRC recomputed
                   so only decoding (or ``simulation.integrity: hmac``) can tell
  ``truncate``     the uplink payload is cut in half
  ``wrong_shape``  a well-formed fp32 payload of shape (1,) holding 5.0
  ``nan_update``   a well-formed fp32 payload of the model's size, all NaN
  ``nan_metrics``  the reported training loss is NaN (a diverged client)
  ``forge_size``   the client claims 10^6 training samples

Faults run inside the ClientApp, so they behave alike on every engine. A lost message comes
back as a reply marked ``M.LOST``, which the server drops before reading it: it is handled
exactly as a reply that never arrived.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig

from fedcomp.compression import build
from fedcomp.config.schema import FAULT_KINDS
from fedcomp.fl import messages as M
from fedcomp.wire import pack_frame, unpack_frame

__all__ = ["FAULT_KINDS", "active_fault", "with_faults"]


def active_fault(cfg: DictConfig, partition_id: int, server_round: int) -> str | None:
    for fault in cfg.simulation.get("faults") or ():
        if partition_id in fault.clients and (fault.get("rounds") is None or server_round in fault.rounds):
            return fault.kind
    return None


def _recrc(payload: bytes) -> bytes:
    """The payload with its trailing CRC-32 recomputed (a corruption the checksum misses)."""
    return payload[:-4] + struct.pack("<I", zlib.crc32(payload[:-4]))


def _corrupt(payload: bytes, seed: int) -> bytes:
    data = bytearray(payload)
    rng = np.random.default_rng(seed)
    for pos in rng.integers(len(data) // 2, len(data) - 4, size=4):  # the body, past the header
        data[pos] ^= int(rng.integers(1, 256))
    return _recrc(bytes(data))


def with_faults(cfg: DictConfig, msg: Message, context: Context, train) -> Message:
    """Run ``train(msg, context)`` with the fault configured for this client and round."""
    config = msg.content[M.CONFIG] if M.CONFIG in msg.content else ConfigRecord()
    kind = active_fault(cfg, int(context.node_config["partition-id"]), int(config.get(M.ROUND, 0)))
    if kind is None:
        return train(msg, context)
    if kind == "crash":
        raise RuntimeError("injected fault: client crash")
    if kind == "lose_down":
        return Message(RecordDict({M.LOST: ConfigRecord()}), reply_to=msg)
    reply = train(msg, context)
    if kind == "lose":
        return Message(RecordDict({M.LOST: ConfigRecord()}), reply_to=msg)
    up, metrics = reply.content[M.UP], reply.content[M.METRICS]
    payload = up[M.PAYLOAD]
    if kind == "corrupt":
        up = ConfigRecord({**up, M.PAYLOAD: _corrupt(payload, int(config.get(M.ROUND, 0)))})  # the tag, if any, is the original
    elif kind in ("truncate", "wrong_shape", "nan_update"):
        if kind == "truncate":
            forged = payload[: len(payload) // 2]
        elif kind == "wrong_shape":
            forged = build("identity").compress(torch.tensor([5.0]))
        else:
            shape = unpack_frame(payload).shape  # the sender's own, valid payload
            forged = pack_frame("identity", torch.float32, shape, np.full(int(np.prod(shape)), np.nan, "<f4").tobytes())
        up = ConfigRecord({M.PAYLOAD: forged})
    elif kind in ("nan_metrics", "forge_size"):
        values = dict(metrics)
        values["train-loss" if kind == "nan_metrics" else "num-examples"] = float("nan") if kind == "nan_metrics" else 10**6
        metrics = MetricRecord(values)
    return Message(RecordDict({M.UP: up, M.METRICS: metrics}), reply_to=msg)
