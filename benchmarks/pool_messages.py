"""The pool engine's message transfer: Flower's protobuf alone against fedcomp's batch framing.

A worker's replies (and the server's train messages) cross the process boundary as one batch.
Flower's own serialisation copies every payload into the protobuf and out again; the pool's
``_serialise_batch`` carries bytes values of 64 KiB or more beside it. For N messages each
holding a payload of S random bytes, the time to serialise and to parse the batch both ways
(median of R passes; the socket copy, the same for both, is not included).

    python benchmarks/pool_messages.py [--messages 25] [--sizes 800000 6600000] [--repeat 5]

Prints a table and writes benchmarks/results/pool_messages.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from overhead import timed

from fedcomp.fl.engine import declare_server_task
from fedcomp.fl.pool import _deserialise_batch, _serialise_batch

RESULTS = Path(__file__).parent / "results" / "pool_messages.json"


def median_ms(fn, repeat: int):
    seconds, out = timed(fn, repeat)
    return seconds * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=25)
    ap.add_argument("--sizes", type=int, nargs="+", default=[800_000, 6_600_000])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    declare_server_task(1)
    rows = []
    print(f"{'payload bytes':>14} {'protobuf ser ms':>16} {'parse ms':>9} {'pool ser ms':>12} {'parse ms':>9}")
    for size in args.sizes:
        batch = [Message(RecordDict({"up": ConfigRecord({"payload": os.urandom(size), "n": i})}), dst_node_id=2 + i,
                         message_type="train") for i in range(args.messages)]
        proto_ser, blobs = median_ms(lambda: [message_to_proto(m).SerializeToString() for m in batch], args.repeat)
        proto_parse, plain = median_ms(lambda: [message_from_proto(ProtoMessage.FromString(b)) for b in blobs], args.repeat)
        pool_ser, framed = median_ms(lambda: _serialise_batch(batch), args.repeat)
        pool_parse, rebuilt = median_ms(lambda: _deserialise_batch(framed), args.repeat)
        assert [m.content["up"]["payload"] for m in plain] == [m.content["up"]["payload"] for m in rebuilt]
        rows.append({"messages": args.messages, "payload_bytes": size, "protobuf_serialise_ms": proto_ser,
                     "protobuf_parse_ms": proto_parse, "pool_serialise_ms": pool_ser, "pool_parse_ms": pool_parse})
        print(f"{size:>14,} {proto_ser:>16.1f} {proto_parse:>9.1f} {pool_ser:>12.1f} {pool_parse:>9.1f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"repeat": args.repeat, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
