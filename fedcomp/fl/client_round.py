"""What every client round shares, whatever the strategy: the client's state between rounds
(error feedback, local optimizer momentum, resets; ``fedcomp.fl.client_state``), the uplink
compressor loaded with that state, and local training from a received model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedcomp import vectors
from fedcomp.compression import Compressor
from fedcomp.fl import messages as M
from fedcomp.fl.algorithms import ClientAlgorithm
from fedcomp.fl.client_state import ClientState
from fedcomp.fl.cohort import TrainingRequest, local_training
from fedcomp.fl.local import local_steps, mean_gradient_sq_norm, samples_trained
from fedcomp.fl.runtime import Runtime


def apply_resets(state: ClientState, config: ConfigRecord) -> None:
    """Clear the error-feedback memory and the optimizer's momentum buffers when the server
    has ordered a reset this client has not applied yet (HGC Sec. 3.2; a client that missed
    the round of the order applies it on its next round)."""
    ordered = int(config.get(M.RESETS, 0))
    if ordered > (state.number(M.RESETS_SEEN) or 0):
        state.drop(M.UP_STATE)
        state.drop(M.OPT_STATE)
        state.set_number(M.RESETS_SEEN, ordered)


def uplink_compressor(rt: Runtime, state: ClientState, seed: int, config: ConfigRecord) -> Compressor:
    """The process's uplink compressor, loaded with this client's state and set for this round."""
    up = rt.compressor("up")
    up.load_state(state.get(M.UP_STATE) or {})
    up.reseed(seed)
    up.set_round(int(config[M.ROUND]))
    if M.RATIO in config:
        up.set_ratio(float(config[M.RATIO]))
    return up


@dataclass
class LocalResult:
    update: torch.Tensor  # local model minus the received one, flat, on the training device (donated to the compressor)
    loss: float
    compute_s: float  # measured on the host (the simulated time is the server's model)
    num_examples: int
    samples: int  # training samples processed
    grad_sq_norm: float
    extras: dict[str, bytes] = field(default_factory=dict)  # a client algorithm's payloads to send up

    def metrics(self, partition_id: int, encode_s: float, decode_s: float) -> MetricRecord:
        return MetricRecord({
            "num-examples": self.num_examples, "train-loss": self.loss, "compute-s": self.compute_s,
            "partition-id": partition_id, "grad-sq-norm": self.grad_sq_norm, "samples": self.samples,
            "encode-s": encode_s, "decode-s": decode_s,
        })


def open_payload(rt: Runtime, record: ConfigRecord) -> bytes:
    """A received payload, its HMAC tag checked when the run seals payloads."""
    payload = record[M.PAYLOAD]
    if rt.seal is not None:
        rt.seal.check(payload, record.get(M.TAG))
    return payload


def reply(rt: Runtime, msg: Message, payload: bytes, result: LocalResult, partition_id: int, encode_s: float, decode_s: float) -> Message:
    """The client's reply: its payload (with its tag when the run seals payloads), metrics and
    the client algorithm's extras."""
    up = ConfigRecord({M.PAYLOAD: payload, M.TAG: rt.seal.tag(payload)} if rt.seal is not None else {M.PAYLOAD: payload})
    content = RecordDict({M.UP: up, M.METRICS: result.metrics(partition_id, encode_s, decode_s)})
    if result.extras:
        content[M.EXTRA] = ConfigRecord(result.extras)
    return Message(content, reply_to=msg)


def train_round(
    rt: Runtime, w: torch.Tensor, state: ClientState, partition_id: int, seed: int, config: ConfigRecord,
    down_extras: ConfigRecord | None = None, momentum_taken: bool = False,
) -> LocalResult:
    """Train this client's shard from the model ``w`` with the round's learning rate and
    momentum and the client algorithm's gradient hook (given the server's ``down_extras``).
    ``momentum_taken``: the uplink compressor applies the momentum itself (DGC's momentum
    correction), so local SGD runs without it."""
    momentum = 0.0 if momentum_taken else float(config[M.MOMENTUM])
    training = {**rt.local_training, "lr": float(config[M.LR]), "momentum": momentum}
    buffers = (state.get(M.OPT_STATE) or {}) if rt.persistent_optimizer else None
    extras = rt.algorithm.decode(down_extras, rt.layout.numel)
    indices = rt.client_indices(partition_id)
    n = len(indices)
    steps = local_steps(n, epochs=training["epochs"], steps=training["steps"], batch_size=training["batch_size"])
    # ``w`` may be the round's shared broadcast (receive_model): a client algorithm's hook gets a copy.
    hooked = type(rt.algorithm).grad_hook is not ClientAlgorithm.grad_hook
    hook = rt.algorithm.grad_hook(rt.model, rt.layout, vectors.clone(w) if hooked else w, state, extras)
    result = local_training(rt, TrainingRequest(w, indices, seed, training, buffers), hook)
    if buffers is not None:
        state.put(M.OPT_STATE, buffers)
    update = result.update
    samples = samples_trained(n, epochs=training["epochs"], steps=training["steps"], batch_size=training["batch_size"])
    # The update stays on the training device for the compressor; a client algorithm that keeps
    # state from it (SCAFFOLD's c_i, in the CPU state store) reads it on the CPU (the tensor
    # itself when training ran there: lent, as ``client_extras`` says).
    reads_update = type(rt.algorithm).client_extras is not ClientAlgorithm.client_extras
    host = update.cpu() if reads_update else update
    up_extras = rt.algorithm.encode(rt.algorithm.client_extras(host, state, extras, steps, training["lr"]))
    return LocalResult(update, result.loss, result.compute_s, n, samples, mean_gradient_sq_norm(update, n, training, result.update_sq_norm),
                       up_extras)


def client_seed(run_seed: int, config: ConfigRecord, partition_id: int) -> int:
    """One seed per (run, round, client): batches and compressor randomness, whichever process
    runs it. ``run_seed``: the config's ``seed``."""
    return int(np.random.SeedSequence([run_seed, int(config[M.ROUND]), partition_id]).generate_state(1)[0])
