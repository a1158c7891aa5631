"""Names of the records fedcomp puts in Flower Messages and Contexts, and how big a message's
non-payload part is.

Model state never travels as a Flower ArrayRecord: each direction carries one compressed
payload (raw bytes in a ConfigRecord), so the bytes counted are the bytes a real link moves.
"""

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

DOWN = "fedcomp.down"  # ConfigRecord {"payload": bytes, "kind": str, "version": int}: server -> client
UP = "fedcomp.up"  # ConfigRecord {"payload": bytes}: client -> server
PAYLOAD = "payload"
TAG = "tag"  # HMAC-SHA256 of the payload (simulation.integrity: hmac)
KIND = "kind"
VERSION = "version"
CONFIG = "config"  # ConfigRecord: round number and local-training settings
LOST = "fedcomp.lost"  # an injected lost message (fl/faults.py): the server treats it as no reply
METRICS = "metrics"  # MetricRecord: num-examples, train-loss, compute-s, partition-id, grad-sq-norm

# Round-config keys (CONFIG) the server sets.
ROUND = "server-round"
LR = "lr"
MOMENTUM = "momentum"  # the clients' local SGD momentum this round
RATIO = "ratio"  # a ratio controller's sparsification ratio for this client
RESETS = "resets"  # how many state resets (HGC Sec. 3.2) the server has ordered so far

# Downlink payload kinds.
MODEL = "model"  # the global model, coded by the downlink compressor (downlink: model)
FULL = "full"  # the global model in fp32, to (re)synchronise a client's replica (downlink: update)
DELTA = "delta"  # the last global update, coded by the downlink compressor (downlink: update)

# Client state (fedcomp.fl.client_state): tensor groups, and numbers.
UP_STATE = "fedcomp.up.state"  # the uplink compressor's state (error feedback, ...)
ALGO_STATE = "fedcomp.algorithm"  # a client algorithm's own state (SCAFFOLD's c_i)
OPT_STATE = "fedcomp.optimizer"  # local SGD momentum buffers (train.optimizer_state: persistent)
RESETS_SEEN = "fedcomp.resets"  # number: the last reset this client applied
REPLICA = "fedcomp.replica"  # {"w": flat model}: the client's copy (downlink: update)
REPLICA_VERSION = "fedcomp.replica.version"  # number: the version the replica holds

# HGC (fl/hgc_strategy.py, fl/hgc_client.py).
EXTRA = "fedcomp.extra"  # ConfigRecord {name: fp32 payload}: a client algorithm's extra tensors (both ways)
HGC = "fedcomp.hgc"  # ConfigRecord: the round's HGC instructions and downlink
HGC_STATE = "fedcomp.hgc.state"  # client tensors: u, v, velocity, mask (EF memory is in UP_STATE)


_SIZES: dict[tuple, int] = {}  # overhead_bytes's sizes by signature


def overhead_bytes(content: RecordDict) -> int:
    """Serialised size (Flower's protobuf) of a message's content with every bytes value --
    payloads, masks, tags, counted as payload -- left empty: the config, metrics and framing
    a link carries on top of the payload (the payloads' own length prefixes, a few bytes each,
    grow with the payload and are not included).

    Serialised once per *size signature* and then looked up: every message of a round has the
    same keys and value types, and Python's protobuf (upb) calls glibc's ``malloc_trim(0)`` once
    in every 10,000 arena blocks it frees (about once per 450 serialisations of a reply's
    records), which hands all the process's free heap pages back to the kernel; the tensors
    allocated next are faulted in afresh. Serialising every reply, the batched mlp round's
    cohort training took 111-305 ms in rounds with a trim (12k-57k page faults) against 84 ms."""
    key = _signature(content)
    if key is None:  # an ArrayRecord: its size depends on its arrays' bytes
        return _proto_size(content)
    size = _SIZES.get(key)
    if size is None:
        if len(_SIZES) >= 4096:  # a run's contents take a handful of signatures; never grow without bound
            _SIZES.clear()
        size = _SIZES[key] = _proto_size(content)
    return size


def _proto_size(content: RecordDict) -> int:
    stripped = RecordDict({
        name: ConfigRecord({k: b"" if isinstance(v, bytes) else v for k, v in rec.items()}) if isinstance(rec, ConfigRecord) else rec
        for name, rec in content.items()
    })
    return recorddict_to_proto(stripped).ByteSize()


def _signature(content: RecordDict) -> tuple | None:
    """What the stripped content's serialised size depends on: record names and types, keys,
    and each value's type and encoded length (a string's UTF-8 length; an int's sign, bit length
    and zigzag bit length, which fix its varint's length whether Flower sends it as sint64 or
    uint64; a list's elements, whose types also pick the list type). None for content with an
    ArrayRecord."""
    parts = []
    for name, rec in content.items():
        if not isinstance(rec, (ConfigRecord, MetricRecord)):
            return None
        stripped = isinstance(rec, ConfigRecord)
        parts.append((name, stripped, tuple((k, _value_signature(v, stripped)) for k, v in rec.items())))
    return tuple(parts)


def _value_signature(v: object, stripped: bool) -> tuple:
    if isinstance(v, bool):
        return ("bool",)
    if isinstance(v, int):  # its varint's length, whether sent as uint64 or zigzag-coded sint64
        return ("int", v < 0, v.bit_length(), (2 * v if v >= 0 else -2 * v - 1).bit_length())
    if isinstance(v, float):
        return ("float",)  # a double: fixed width
    if isinstance(v, str):
        return ("str", len(v.encode()))
    if isinstance(v, bytes):
        return ("bytes", 0 if stripped else len(v))
    if isinstance(v, list):
        return ("list", tuple(_value_signature(e, False) for e in v))
    raise TypeError(f"no size signature for a {type(v).__name__} record value")
