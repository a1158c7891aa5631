"""Payload size and speed of every compressor against its information-theoretic limit.

For each d in {10^5, 10^6, 11.2 x 10^6 (ResNet-18)} and k/d in {0.1%, 1%} (the ratio applies
to the sparsifiers; quantizers and casts run once per d), on a Gaussian vector:

  bytes       the payload length
  / limit     bytes over the information-theoretic size of what the payload says:
              log2 C(d, k) bits for the positions of the k kept values, plus 32 bits per
              fp32 value, or the empirical entropy of the quantized symbols (+ 32 bits per scale)
  comp / dec  milliseconds to compress / decompress (median of --repeat runs)
  topk ms     bare ``torch.topk(x.abs(), k)`` on the same tensor, and the ratio comp / topk

    python benchmarks/codecs.py [--sizes 100000 1000000 11200000] [--repeat 5]

Prints a table and writes benchmarks/results/codecs.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
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


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 11_200_000])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.001, 0.01])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

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
                c = build(name, **params)
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
    RESULTS.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
