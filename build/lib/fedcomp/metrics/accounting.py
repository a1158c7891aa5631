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


def compression_ratios(rows: list[dict[str, Any]], dense_bytes: int) -> dict[str, dict[str, float | None]]:
    """``rows``: metrics.jsonl records (with per-client byte counts). Traffic of clients that
    failed or were dropped counts in Total CR against the dense traffic it stands for (a
    download, and an upload when one arrived); Max CR looks at aggregated clients only. A ratio
    with nothing sent is null."""
    best = {"up": 0.0, "down": 0.0, "total": 0.0}
    sums = {"up": 0, "down": 0, "dense_up": 0, "dense_down": 0}
    for row in rows:
        for c in row["clients"].values():
            up, down = c["bytes_up"], c["bytes_down"]
            best["up"] = max(best["up"], dense_bytes / up if up else 0.0)
            best["down"] = max(best["down"], dense_bytes / down if down else 0.0)
            best["total"] = max(best["total"], 2 * dense_bytes / (up + down) if up + down else 0.0)
            sums["up"], sums["down"] = sums["up"] + up, sums["down"] + down
            sums["dense_up"], sums["dense_down"] = sums["dense_up"] + dense_bytes, sums["dense_down"] + dense_bytes
        for f in row.get("failed", []):
            sums["up"], sums["down"] = sums["up"] + f["bytes_up"], sums["down"] + f["bytes_down"]
            sums["dense_up"] += dense_bytes if f["bytes_up"] else 0
            sums["dense_down"] += dense_bytes if f["bytes_down"] else 0
    ratio = lambda dense, sent: dense / sent if sent else None  # noqa: E731
    total = {
        "up": ratio(sums["dense_up"], sums["up"]),
        "down": ratio(sums["dense_down"], sums["down"]),
        "total": ratio(sums["dense_up"] + sums["dense_down"], sums["up"] + sums["down"]),
    }
    return {"max_cr": best, "total_cr": total}


def speedup(baseline_sim_time_s: float, sim_time_s: float) -> float:
    """How many times faster than the baseline (FedAvg) the same number of rounds ran under
    the network model (HGC Table 2 uses 1000 Mbit/s links: ``network=lan_1gbps``)."""
    return baseline_sim_time_s / sim_time_s
