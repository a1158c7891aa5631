"""Payload size and speed of every compressor against its information-theoretic limit.

For each d in {10^5, 10^6, 11.2 x 10^6 (ResNet-18)} and k/d in {0.1%, 1%} (the ratio applies
to the sparsifiers; quantizers and casts run once per d), on a Gaussian vector:

  bytes       the payload length
  / limit     bytes over the information-theoretic size of what the payload says:
              log2 C(d, k) bits for the positions of the k kept values, plus 32 bits per
              fp32 value, or the empirical entropy of the quantized symbols (+ 32 bits per scale)
  comp / dec  milliseconds to compress / decompress (median of --repeat runs)
  topk ms     bare ``torch.topk(x.abs(), k)`` on the same tensor, and the ratio comp / topk

    python benchmarks/codecs.py [--sizes 100000 1000000 11200000] [--repeat 5] [--error-feedback]

``--error-feedback`` wraps every compressor in error feedback, as clients run it: the times
then include the residual's update, taken after one warm-up call has made the residual non-zero.

Prints a table and writes benchmarks/results/codecs.json.

    python benchmarks/codecs.py --calibrate

fits each codec's encode and decode time (one thread) to c0 + c_values x d + c_bytes x payload
bytes over several sizes and ratios -- every registered compressor and HGC's uplink, relay,
paper broadcast and resync -- and writes fedcomp/network/codec_times.json with this machine's
single-thread sgemm rate as the reference the simulated clock scales device speeds against.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from overhead import sgemm_gflops, timed
from scipy.special import gammaln

from fedcomp.compression import build, registered

RESULTS = Path(__file__).parent / "results" / "codecs.json"
SPARSE = {"topk", "randomk", "threshold", "adaptive_threshold", "stochastic", "sq"}
FP32_VALUES = {"topk", "randomk", "threshold", "adaptive_threshold", "stochastic"}


def log2_binomial(d: int, k: int) -> float:
    return float((gammaln(d + 1) - gammaln(k + 1) - gammaln(d - k + 1)) / math.log(2))


def entropy_bits(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def limit_bytes(name: str, y: torch.Tensor) -> float:
    """Information-theoretic size of the reconstruction ``y`` as the compressor describes it."""
    d = y.numel()
    if name == "identity":
        return 4 * d
    if name in ("fp16", "bf16"):
        return 2 * d
    nz = y[y != 0].numpy()
    if name in FP32_VALUES:
        return (log2_binomial(d, len(nz)) + 32 * len(nz)) / 8
    if name == "sq":
        return (log2_binomial(d, len(nz)) + entropy_bits(np.sign(nz)) + 32) / 8
    # dense quantizers: symbols over all d coordinates, plus one scale
    return (entropy_bits(y.numpy()) + 32) / 8


def compressor_params(name: str, ratio: float, x: torch.Tensor) -> dict:
    if name == "threshold":
        return {"v": float(torch.quantile(x[:1_000_000].abs(), 1 - ratio))}
    return {"ratio": ratio} if name in ("topk", "randomk", "stochastic", "sq", "stc", "dgc") else {}


def hgc_samples(x: torch.Tensor, ratio: float, repeat: int) -> list[tuple[str, str, int, float]]:
    """(codec, way, bytes, seconds) for HGC's payloads at one ratio: the client's uplink
    encode (mask, 1-bit levels, prediction, coding), the server's decode, and a client's
    decode of the relay (4 entries), the paper broadcast and a resync."""
    from fedcomp.coding import encode_indices
    from fedcomp.hgc.codec import (
        Entry,
        aggregate_entries,
        decode_broadcast,
        decode_relay,
        decode_sync,
        decode_uplink,
        encode_broadcast,
        encode_relay,
        encode_sync,
        encode_uplink,
        entry_mask,
        entry_values,
        on_mask,
    )
    from fedcomp.hgc.predictor import Predictor, xor_residue
    from fedcomp.hgc.quantizer import quantize_segments
    from fedcomp.hgc.segments import Segments

    d = x.numel()
    segments, predictor = Segments.of([d]), Predictor()
    predictor.observe(x.roll(1), None)

    def encode():
        mask = segments.select(x, ratio)
        cuts = segments.cuts(mask)
        symbols, levels = quantize_segments(x[mask], cuts, 1)
        residue = xor_residue(symbols, predictor.predicted_symbols(mask, 1, cuts))
        return encode_uplink(Entry.coded(1, levels, residue, True, encode_indices(mask.numpy(), d), False), d)

    enc_s, up = timed(encode, repeat)

    def decode():
        entry, _ = decode_uplink(up, d)
        mask = entry_mask(entry, None, d)
        return entry_values(entry, mask, predictor, segments)

    dec_s, _ = timed(decode, repeat)
    entry, _ = decode_uplink(up, d)
    mask = entry_mask(entry, None, d)
    relay = encode_relay([entry] * 4, [0.25] * 4, d, keep_masks=False)
    relay_s, _ = timed(lambda: aggregate_entries(*decode_relay(relay, d)[:2], mask, predictor, segments), repeat)
    paper = encode_broadcast(x[mask], d, None)
    paper_s, _ = timed(lambda: on_mask(*decode_broadcast(paper, mask, d)[1::-1], d), repeat)
    sync = encode_sync(x, predictor.state())
    sync_s, _ = timed(lambda: decode_sync(sync, d), repeat)
    return [("hgc", "encode", len(up), enc_s), ("hgc", "decode", len(up), dec_s), ("hgc.relay", "decode", len(relay), relay_s),
            ("hgc.paper", "decode", len(paper), paper_s), ("hgc.sync", "decode", len(sync), sync_s),
            ("hgc.relay", "encode", len(relay), 0.0), ("hgc.paper", "encode", len(paper), 0.0), ("hgc.sync", "encode", len(sync), 0.0)]


def calibrate(sizes: list[int], ratios: list[float], repeat: int) -> None:
    """Fit every codec's time per direction to c0 + c_values d + c_bytes bytes (see module doc)."""
    from scipy.optimize import nnls

    from fedcomp.network.codec_time import TABLE
    from fedcomp.wire import frame_codec

    torch.set_num_threads(1)
    samples: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
    for d in sizes:
        x = torch.randn(d, generator=torch.Generator().manual_seed(d))
        for ratio in ratios:
            for name in registered():
                c = build(name, **compressor_params(name, ratio, x))
                enc_s, payload = timed(lambda: (c.reseed(0), c.compress(x))[1], repeat)
                dec_s, _ = timed(lambda: c.decompress(payload), repeat)
                codec = frame_codec(payload)
                samples.setdefault((codec, "encode"), []).append((d, len(payload), enc_s))
                samples.setdefault((codec, "decode"), []).append((d, len(payload), dec_s))
            for codec, way, nbytes, seconds in hgc_samples(x, ratio, repeat):
                samples.setdefault((codec, way), []).append((d, nbytes, seconds))
            print(f"calibrated d={d} ratio={ratio}", flush=True)
    table: dict = {"reference_gflops": round(sgemm_gflops(), 2), "encode": {}, "decode": {}}
    for (codec, way), rows in sorted(samples.items()):
        a = np.array([[1.0, d, b] for d, b, _ in rows])
        coef, _ = nnls(a, np.array([t for *_, t in rows]))
        table[way][codec] = [float(f"{v:.4g}") for v in coef]
    lines = [f'{{"reference_gflops": {table["reference_gflops"]},']
    for i, way in enumerate(("encode", "decode")):
        body = ",\n".join(f"  {json.dumps(codec)}: {json.dumps(c)}" for codec, c in table[way].items())
        lines.append(f' "{way}": {{\n{body}\n }}' + ("," if i == 0 else "}"))
    TABLE.write_text("\n".join(lines) + "\n")
    print(f"wrote {TABLE} (reference {table['reference_gflops']} GFLOP/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 11_200_000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.001, 0.01])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calibrate", action="store_true", help="fit the codec time table (fedcomp/network/codec_times.json)")
    ap.add_argument("--error-feedback", action="store_true", help="every compressor wrapped in error feedback")
    args = ap.parse_args()
    if args.calibrate:
        calibrate([s for s in args.sizes if s <= 4_000_000] or args.sizes, sorted(set(args.ratios) | {0.1}), args.repeat)
        return

    rows = []
    print(f"{'d':>10} {'k/d':>6} {'compressor':>19} {'bytes':>11} {'/limit':>7} {'comp ms':>8} {'dec ms':>8} {'topk ms':>8} {'/topk':>6}")
    for d in args.sizes:
        x = torch.randn(d, generator=torch.Generator().manual_seed(d))
        threshold_v = float(torch.quantile(x[:1_000_000].abs(), 0.99))  # ~1% of entries
        for ratio in args.ratios:
            k = max(1, round(ratio * d))
            topk_s, _ = timed(lambda: torch.topk(x.abs(), k, sorted=False), args.repeat)
            for name in registered():
                if name not in SPARSE and ratio != args.ratios[0]:
                    continue  # ratio-free compressors once per d
                params = {"ratio": ratio} if name in ("topk", "randomk", "stochastic", "sq") else {}
                if name == "threshold":
                    params = {"v": threshold_v}  # keeps ~1% of a Gaussian vector
                c = build(name, error_feedback=args.error_feedback, **params)
                if args.error_feedback:
                    c.compress(x)  # a non-zero residual, as from the second round on
                comp_s, payload = timed(lambda: (c.reseed(0), c.compress(x))[1], args.repeat)
                dec_s, y = timed(lambda: c.decompress(payload), args.repeat)
                row = {
                    "d": d, "ratio": ratio if name in SPARSE else None, "compressor": name,
                    "bytes": len(payload), "limit_bytes": limit_bytes(name, y),
                    "compress_ms": comp_s * 1e3, "decompress_ms": dec_s * 1e3, "topk_ms": topk_s * 1e3,
                }
                row["size_over_limit"] = row["bytes"] / row["limit_bytes"]
                row["compress_over_topk"] = comp_s / topk_s
                rows.append(row)
                print(f"{d:>10} {ratio if name in SPARSE else '-':>6} {name:>19} {row['bytes']:>11,} "
                      f"{row['size_over_limit']:>7.3f} {row['compress_ms']:>8.1f} {row['decompress_ms']:>8.1f} "
                      f"{row['topk_ms']:>8.1f} {row['compress_over_topk']:>6.2f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "error_feedback": args.error_feedback, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
