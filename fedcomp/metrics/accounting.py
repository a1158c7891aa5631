"""Compression ratios as HGC's Table 2 reports them (003_... Sec. 5.1).

The reference is FedAvg: every participating client sends and receives the dense fp32 model
(``dense_bytes``, the identity payload of the same model) every round.
  Max CR   (per direction) the best single (round, client): dense / bytes that client moved
  Total CR (per direction) the whole run: sum of dense over all (round, client) / sum of bytes
  "total" combines both directions: 2 x dense / (up + down).
The speedup against FedAvg needs a FedAvg run's simulated time; see ``speedup``.
"""

from __future__ import annotations

from typing import Any


def compression_ratios(rows: list[dict[str, Any]], dense_bytes: int) -> dict[str, dict[str, float]]:
    """``rows``: metrics.jsonl records (with per-client byte counts)."""
    best = {"up": 0.0, "down": 0.0, "total": 0.0}
    sums = {"up": 0, "down": 0, "dense": 0}
    for row in rows:
        for c in row["clients"].values():
            up, down = c["bytes_up"], c["bytes_down"]
            best["up"] = max(best["up"], dense_bytes / up if up else float("inf"))
            best["down"] = max(best["down"], dense_bytes / down if down else float("inf"))
            best["total"] = max(best["total"], 2 * dense_bytes / (up + down) if up + down else float("inf"))
            sums["up"] += up
            sums["down"] += down
            sums["dense"] += dense_bytes
    total = {
        "up": sums["dense"] / sums["up"] if sums["up"] else float("inf"),
        "down": sums["dense"] / sums["down"] if sums["down"] else float("inf"),
        "total": 2 * sums["dense"] / (sums["up"] + sums["down"]) if sums["up"] + sums["down"] else float("inf"),
    }
    return {"max_cr": best, "total_cr": total}


def speedup(baseline_sim_time_s: float, sim_time_s: float) -> float:
    """How many times faster than the baseline (FedAvg) the same number of rounds ran under
    the network model (HGC Table 2 uses 1000 Mbit/s links: ``network=lan_1gbps``)."""
    return baseline_sim_time_s / sim_time_s
