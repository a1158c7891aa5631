"""How long encoding and decoding a payload takes, from a calibrated throughput table.

Each codec (the name in a payload's frame) has, per direction, a cost in seconds on the
reference machine, c0 + c_values x d + c_bytes x payload bytes (d: the tensor's length), fitted
by ``benchmarks/codecs.py --calibrate`` and shipped as ``codec_times.json`` together with the
reference machine's single-thread sgemm rate. A device with F FLOP/s takes that time x
reference FLOP/s / F. Layer-wise payloads cost what their inner codec costs for the whole
vector. A codec missing from the table (a plug-in) is charged like ``identity`` and named in a
warning once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("codec_times.json")
log = logging.getLogger("fedcomp")


@dataclass(frozen=True)
class CodecCost:
    c0: float
    per_value: float
    per_byte: float

    def seconds(self, d: int, nbytes: int) -> float:
        return self.c0 + self.per_value * d + self.per_byte * nbytes


class CodecTimes:
    def __init__(self, reference_flops: float, encode: dict[str, CodecCost], decode: dict[str, CodecCost]) -> None:
        self.reference_flops, self.encode, self.decode = reference_flops, encode, decode
        self._warned: set[str] = set()

    @classmethod
    def from_file(cls, path: Path = TABLE) -> "CodecTimes":
        table = json.loads(path.read_text())
        costs = {way: {name: CodecCost(*c) for name, c in table[way].items()} for way in ("encode", "decode")}
        return cls(table["reference_gflops"] * 1e9, costs["encode"], costs["decode"])

    def seconds(self, codec: str, way: str, d: int, nbytes: int, flops: float) -> float:
        """Time to ``way`` ("encode" | "decode") a ``codec`` payload of ``nbytes`` for a
        length-``d`` tensor on a device of ``flops`` FLOP/s."""
        table = self.encode if way == "encode" else self.decode
        name = codec.removeprefix("layerwise.")
        if name not in table:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("codec %r has no calibrated time; charged like identity", name)
            name = "identity"
        return table[name].seconds(d, nbytes) * self.reference_flops / flops


@lru_cache(maxsize=1)
def shipped_codec_times() -> CodecTimes:
    return CodecTimes.from_file()
