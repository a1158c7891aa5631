"""HGC payloads and the aggregation that the server and the clients both run.

One client's entry (its uplink payload body, and its part of the downlink relay)::

    flags u8 (bit 0: carries a mask, bit 1: symbols are XOR residues against the prediction)
    bits u8 (q) | segments u32 | [mask blob length u64 | Rice-coded mask]
    segments x 2^q level means f32 | symbol stream length u64 | symbol stream
    (``fedcomp.coding.encode_symbols``)

Uplink payload: frame "hgc" of shape (d,) around one entry. Downlinks:

  relay (default)  frame "hgc.relay" around  n u32 | n weights f32 | n x (length u64 | entry),
                   the round's entries in aggregation order with the shared mask left out
                   (every participant already holds it). A lossless coding of the aggregated
                   gradient: a client rebuilds exactly the g~ the server applied, without the
                   server re-sparsifying or re-quantizing it.
  paper            frame "hgc.paper": what the paper's server broadcasts -- g~ on the mask as
                   fp32, deflated:  flags u8 (bit 0: a Rice-coded mask follows, for own masks)
                   | [mask length u64 | mask] | zlib(fp32 values). The server applies the
                   fp32-rounded g~ itself, so both ends still hold the same model.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from fedcomp.coding import decode_indices, decode_symbols, encode_symbols
from fedcomp.hgc.predictor import Predictor, xor_residue
from fedcomp.hgc.quantizer import dequantize_segments
from fedcomp.hgc.segments import Segments
from fedcomp.wire import PayloadError, pack_frame, unpack_frame

HAS_MASK, PREDICTIVE = 1, 2
_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<BBI")


@dataclass
class Entry:
    """One client's quantized, sparsified gradient as it travels. The symbols (int64 residues
    when ``predictive``, else level symbols) are kept as their coded ``stream``: a receiver
    decodes them (``symbols``) only once it knows how many the mask holds."""

    bits: int
    levels: np.ndarray  # float32, (segments, 2^bits)
    stream: bytes  # fedcomp.coding.encode_symbols output
    predictive: bool
    mask_blob: bytes | None = None  # Rice-coded mask, when this entry carries one

    @classmethod
    def coded(cls, bits: int, levels: np.ndarray, symbols: np.ndarray, predictive: bool, mask_blob: bytes | None, deflate: bool) -> "Entry":
        return cls(bits, levels, encode_symbols(symbols, 1 << bits, deflate), predictive, mask_blob)

    def symbols(self, count: int) -> np.ndarray:
        """The entry's ``count`` symbols (a stream claiming another count is refused unread)."""
        return decode_symbols(self.stream, 1 << self.bits, count=count)

    def to_bytes(self, with_mask: bool = True) -> bytes:
        mask = self.mask_blob if with_mask else None
        flags = (HAS_MASK if mask is not None else 0) | (PREDICTIVE if self.predictive else 0)
        out = bytearray(_HEAD.pack(flags, self.bits, len(self.levels)))
        if mask is not None:
            out += _U64.pack(len(mask)) + mask
        out += self.levels.astype("<f4").tobytes() + _U64.pack(len(self.stream)) + self.stream
        return bytes(out)


def _take(data: memoryview, pos: int, n: int, what: str) -> tuple[memoryview, int]:
    if n > len(data) - pos:
        raise PayloadError(f"truncated HGC {what}")
    return data[pos : pos + n], pos + n


def parse_entry(data: memoryview) -> Entry:
    head, pos = _take(data, 0, _HEAD.size, "entry header")
    flags, bits, segments = _HEAD.unpack(head)
    if flags & ~(HAS_MASK | PREDICTIVE) or not 1 <= bits <= 8:
        raise PayloadError(f"bad HGC entry header (flags {flags}, bits {bits})")
    mask_blob = None
    if flags & HAS_MASK:
        raw, pos = _take(data, pos, _U64.size, "mask length")
        mask, pos = _take(data, pos, _U64.unpack(raw)[0], "mask")
        mask_blob = bytes(mask)
    raw, pos = _take(data, pos, (4 << bits) * segments, "levels")
    levels = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(segments, 1 << bits)
    if not np.isfinite(levels).all():
        raise PayloadError("HGC level means are not finite")
    raw, pos = _take(data, pos, _U64.size, "symbol length")
    stream, pos = _take(data, pos, _U64.unpack(raw)[0], "symbols")
    if pos != len(data):
        raise PayloadError("trailing bytes after an HGC entry")
    return Entry(bits, levels, bytes(stream), bool(flags & PREDICTIVE), mask_blob)


def encode_uplink(entry: Entry, d: int) -> bytes:
    return pack_frame("hgc", torch.float32, (d,), entry.to_bytes())


def decode_uplink(payload: bytes, d: int | None = None) -> tuple[Entry, int]:
    """(entry, d); with ``d`` a payload for another dimension is refused unread."""
    frame = unpack_frame(payload, expect="hgc", shape=None if d is None else (d,))
    return parse_entry(memoryview(frame.body)), frame.numel


def encode_relay(entries: list[Entry], weights: list[float], d: int, keep_masks: bool) -> bytes:
    body = bytearray(struct.pack("<I", len(entries)) + np.asarray(weights, dtype="<f4").tobytes())
    for e in entries:
        raw = e.to_bytes(with_mask=keep_masks)
        body += _U64.pack(len(raw)) + raw
    return pack_frame("hgc.relay", torch.float32, (d,), body)


def decode_relay(payload: bytes, d: int | None = None) -> tuple[list[Entry], np.ndarray, int]:
    frame = unpack_frame(payload, expect="hgc.relay", shape=None if d is None else (d,))
    data = memoryview(frame.body)
    raw, pos = _take(data, 0, 4, "relay count")
    (n,) = struct.unpack("<I", raw)
    raw, pos = _take(data, pos, 4 * n, "relay weights")
    weights = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    entries = []
    for _ in range(n):
        raw, pos = _take(data, pos, _U64.size, "relay entry length")
        chunk, pos = _take(data, pos, _U64.unpack(raw)[0], "relay entry")
        entries.append(parse_entry(chunk))
    if pos != len(data):
        raise PayloadError("trailing bytes after the HGC relay")
    return entries, weights, frame.numel


def encode_broadcast(values: torch.Tensor, d: int, mask_blob: bytes | None) -> bytes:
    """The paper's downlink: fp32 values of g~ on the mask, deflated (mask included for own masks)."""
    body = bytearray([1 if mask_blob is not None else 0])
    if mask_blob is not None:
        body += _U64.pack(len(mask_blob)) + mask_blob
    body += zlib.compress(values.float().numpy().astype("<f4").tobytes(), 9)
    return pack_frame("hgc.paper", torch.float32, (d,), body)


def decode_broadcast(payload: bytes, mask: torch.Tensor | None, d: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mask, fp32 values, d); ``mask`` is the shared mask the receiver holds, unless the
    broadcast carries one. Inflation stops at the 4 bytes per mask entry the values need."""
    frame = unpack_frame(payload, expect="hgc.paper", shape=None if d is None else (d,))
    data = memoryview(frame.body)
    head, pos = _take(data, 0, 1, "broadcast flags")
    if head[0] > 1:
        raise PayloadError(f"bad HGC broadcast flags {head[0]}")
    if head[0]:
        raw, pos = _take(data, pos, _U64.size, "broadcast mask length")
        blob, pos = _take(data, pos, _U64.unpack(raw)[0], "broadcast mask")
        mask = torch.from_numpy(decode_indices(bytes(blob), frame.numel))
    elif mask is None:
        raise PayloadError("HGC broadcast without a mask, and no shared mask known")
    expected = 4 * len(mask)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(bytes(data[pos:]), expected)
    except zlib.error as exc:
        raise PayloadError(f"corrupt HGC broadcast values: {exc}") from None
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise PayloadError(f"HGC broadcast does not hold {len(mask)} fp32 values")
    values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
    if not torch.isfinite(values).all():
        raise PayloadError("HGC broadcast values are not finite")
    return mask, values, frame.numel


def entry_mask(entry: Entry, shared: torch.Tensor | None, d: int) -> torch.Tensor:
    """The coordinates an entry's values sit on: its own mask, else the round's shared one."""
    if entry.mask_blob is not None:
        return torch.from_numpy(decode_indices(entry.mask_blob, d))
    if shared is None:
        raise PayloadError("HGC entry without a mask, and no shared mask known")
    return shared


def entry_values(entry: Entry, mask: torch.Tensor, predictor: Predictor, segments: Segments) -> torch.Tensor:
    """Undo the XOR residue (with the prediction on ``mask``) and dequantize, segment by segment."""
    if len(entry.levels) != segments.count:
        raise PayloadError(f"HGC entry has {len(entry.levels)} level sets for {segments.count} segments")
    cuts = segments.cuts(mask)
    symbols = entry.symbols(len(mask))
    if entry.predictive:
        symbols = xor_residue(symbols, predictor.predicted_symbols(mask, entry.bits, cuts))
    if symbols.size and symbols.max() >= (1 << entry.bits):
        raise PayloadError("HGC symbol outside its levels")
    return dequantize_segments(symbols, entry.levels, cuts)


def aggregate_entries(
    entries: list[Entry], weights: np.ndarray, shared: torch.Tensor | None, predictor: Predictor, segments: Segments,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo each entry's residue on its mask (own, else ``shared``) and aggregate them:
    (g~, the union of the masks the entries sit on)."""
    d = segments.numel
    parts = []
    for entry in entries:
        mask = entry_mask(entry, shared, d)
        parts.append((mask, entry_values(entry, mask, predictor, segments)))
    if all(e.mask_blob is None for e in entries) and shared is not None:
        union = shared
    else:
        union = torch.unique(torch.cat([m for m, _ in parts])) if parts else torch.zeros(0, dtype=torch.int64)
    return aggregate(parts, weights, d), union


def aggregate(parts: list[tuple[torch.Tensor, torch.Tensor]], weights: np.ndarray, d: int) -> torch.Tensor:
    """g~ = sum_i w_i S_i(Q(x_i)), in float64, in the order given -- the one function both
    the server and every client run, so they hold bit-identical aggregates."""
    g = torch.zeros(d, dtype=torch.float64)
    for (mask, values), w in zip(parts, weights.astype(np.float64)):
        g.index_add_(0, mask, values.double() * float(w))
    return g


def on_mask(values: torch.Tensor, mask: torch.Tensor, d: int) -> torch.Tensor:
    """A dense float64 vector holding ``values`` at ``mask`` (the paper broadcast's g~)."""
    return torch.zeros(d, dtype=torch.float64).index_put_((mask,), values.double())


SYNC_BUFFERS = ("u", "v", "velocity")  # fp64 buffers a sync may carry, in this order
_SCALES = struct.Struct("<dd")


def encode_sync(w: torch.Tensor, buffers: dict[str, torch.Tensor]) -> bytes:
    """Full resynchronisation of a client that missed rounds: the model (fp32) and whichever
    of the predictor buffers u, v (with their two scales, ``Predictor.state``) and the
    server-momentum velocity are present (fp64, so they stay bit-identical).
    Body: flags u8 (bit i: SYNC_BUFFERS[i] follows) | [scales 2 x f64, with u/v] | w | buffers."""
    flags = sum(1 << i for i, name in enumerate(SYNC_BUFFERS) if name in buffers)
    if ("u" in buffers) != ("v" in buffers):
        raise ValueError("a sync carries both predictor buffers or neither")
    # The arrays go into the frame as they are (views where already little-endian): one copy of
    # the 46 MB a cnn4 resync carries instead of four (78 -> 26 ms).
    body: list = [bytes([flags])]
    if "u" in buffers:
        body.append(_SCALES.pack(*buffers["scale"].tolist()))
    body.append(np.ascontiguousarray(w.detach().float().numpy(), "<f4"))
    for name in SYNC_BUFFERS:
        if name in buffers:
            body.append(np.ascontiguousarray(buffers[name].detach().double().numpy(), "<f8"))
    return pack_frame("hgc.sync", torch.float32, (w.numel(),), body)


def decode_sync(payload: bytes, d: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(w, buffers); the predictor buffers come with their scales (zeros and unit scales when
    the sync does not carry them), a missing velocity as zeros."""
    frame = unpack_frame(payload, expect="hgc.sync", shape=None if d is None else (d,))
    d, body = frame.numel, frame.body
    if not body or body[0] >= 1 << len(SYNC_BUFFERS) or (body[0] & 1) != (body[0] >> 1 & 1):
        raise PayloadError("bad HGC sync flags")
    present = [name for i, name in enumerate(SYNC_BUFFERS) if body[0] >> i & 1]
    head = 1 + (_SCALES.size if "u" in present else 0)
    if len(body) != head + 4 * d + 8 * d * len(present):
        raise PayloadError(f"HGC sync body of {len(body)} bytes does not fit d={d}")
    scale = _SCALES.unpack_from(body, 1) if "u" in present else (1.0, 1.0)
    if not all(np.isfinite(scale)) or min(scale) <= 0:
        raise PayloadError("bad HGC predictor scales")
    w = torch.from_numpy(np.frombuffer(body, "<f4", d, head).astype(np.float32))
    offsets = {name: head + 4 * d + 8 * d * i for i, name in enumerate(present)}
    buffers = {name: torch.from_numpy(np.frombuffer(body, "<f8", d, offsets[name]).astype(np.float64)) if name in offsets
               else torch.zeros(d, dtype=torch.float64) for name in SYNC_BUFFERS}
    buffers["scale"] = torch.tensor(scale, dtype=torch.float64)
    return w, buffers


def momentum_step(g: torch.Tensor, velocity: torch.Tensor, momentum: float) -> torch.Tensor:
    """Server momentum on the aggregate, mirrored by the clients: v <- m v + g (float64)."""
    return momentum * velocity + g if momentum else g


def hgc_step(g: torch.Tensor, server_lr: float) -> torch.Tensor:
    """The model step from an aggregate, identical on the server and the clients."""
    return (server_lr * g).float()
