"""Per-client system profiles: link bandwidths, latency, device speed, and availability.

A profile is what a client's hardware and network give it: uplink / downlink bandwidth
(bit/s), one-way latency (s) and training throughput (FLOP/s). Profiles come from the network
preset (``fedcomp/conf/network/*.yaml``, sources documented there), spread across clients by
``heterogeneity``:

  ``none``       every client has the preset's profile
  ``lognormal``  bandwidths and device speed x exp(N(-s^2/2, s^2)): mean factor 1, so the preset
                 stays the average client; ``sigma`` for the links, ``compute_sigma`` for speed
  ``csv``        a trace: columns ``client`` and any of ``uplink_mbps``, ``downlink_mbps``,
                 ``latency_ms``, ``gflops`` (missing columns and clients keep the preset); with a
                 ``from_s`` column a client may have several rows, each in force from that
                 simulated time on (time-varying links, FedScale-style)

Availability (``network.availability``): a per-client on/off trace (CSV ``client, from_s,
to_s``: the client is online in those intervals; clients not in the trace always are) and/or
a dropout probability: each sampled client independently drops mid-round with that
probability, drawn reproducibly from (seed, round, client).
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """A profile or availability trace is missing or malformed (the message names the file)."""


@dataclass(frozen=True)
class ClientProfile:
    uplink_bps: float
    downlink_bps: float
    latency_s: float
    flops: float  # training throughput, FLOP/s

    def transfer_s(self, nbytes: int, direction: str) -> float:
        """One message: latency plus serialisation at the link's rate."""
        return self.latency_s + 8.0 * nbytes / (self.uplink_bps if direction == "up" else self.downlink_bps)


class Profiles:
    """Each client's profile over simulated time (one row per client unless the trace has more)."""

    def __init__(self, rows: list[list[tuple[float, ClientProfile]]]) -> None:
        self.rows = [sorted(r, key=lambda x: x[0]) for r in rows]
        self._starts = [[t for t, _ in r] for r in self.rows]

    def at(self, client: int, t: float = 0.0) -> ClientProfile:
        i = bisect.bisect_right(self._starts[client], t) - 1
        return self.rows[client][max(i, 0)][1]

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_config(cls, cfg, num_clients: int, seed: int) -> "Profiles":
        base = ClientProfile(cfg.uplink_mbps * 1e6, cfg.downlink_mbps * 1e6, cfg.latency_ms / 1e3, cfg.device_gflops * 1e9)
        het = cfg.heterogeneity
        if het.kind == "none":
            return cls([[(0.0, base)] for _ in range(num_clients)])
        if het.kind == "lognormal":
            # Mean-one factors, so the preset stays the average client.
            rng = np.random.default_rng([seed, 0x4E7])
            up, down = rng.lognormal(-het.sigma**2 / 2, het.sigma, size=(2, num_clients))
            speed = rng.lognormal(-het.compute_sigma**2 / 2, het.compute_sigma, size=num_clients)
            return cls([[(0.0, replace(base, uplink_bps=base.uplink_bps * u, downlink_bps=base.downlink_bps * d, flops=base.flops * s))]
                        for u, d, s in zip(up, down, speed)])
        return cls(_profiles_from_csv(Path(het.path), base, num_clients))


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {missing}")
        return list(reader)


def _number(row: dict[str, str], key: str, path: Path, line: int) -> float | None:
    raw = (row.get(key) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise TraceError(f"{path}:{line}: {key}={raw!r} is not a number") from None
    if not np.isfinite(value) or value < 0 or (value == 0 and key != "latency_ms" and key != "from_s"):
        raise TraceError(f"{path}:{line}: {key}={raw!r} must be positive")
    return value


def _client(row: dict[str, str], path: Path, line: int, num_clients: int) -> int:
    try:
        c = int(row["client"])
    except ValueError:
        raise TraceError(f"{path}:{line}: client={row['client']!r} is not an integer") from None
    if not 0 <= c < num_clients:
        raise TraceError(f"{path}:{line}: client {c} outside 0..{num_clients - 1}")
    return c


def _profiles_from_csv(path: Path, base: ClientProfile, num_clients: int) -> list[list[tuple[float, ClientProfile]]]:
    rows: list[list[tuple[float, ClientProfile]]] = [[] for _ in range(num_clients)]
    scale = {"uplink_mbps": ("uplink_bps", 1e6), "downlink_mbps": ("downlink_bps", 1e6), "latency_ms": ("latency_s", 1e-3),
             "gflops": ("flops", 1e9)}
    for line, row in enumerate(_read_csv(path, ("client",)), start=2):
        c = _client(row, path, line, num_clients)
        fields = {}
        for column, (field, factor) in scale.items():
            value = _number(row, column, path, line)
            if value is not None:
                fields[field] = value * factor
        rows[c].append((_number(row, "from_s", path, line) or 0.0, replace(base, **fields)))
    return [r or [(0.0, base)] for r in rows]


class Availability:
    """Who can be sampled at a time, and who drops mid-round."""

    def __init__(self, num_clients: int, seed: int, dropout: float = 0.0, intervals: dict[int, list[tuple[float, float]]] | None = None) -> None:
        self.num_clients, self.seed, self.dropout = num_clients, seed, dropout
        self.intervals = intervals or {}

    @classmethod
    def from_config(cls, cfg, num_clients: int, seed: int) -> "Availability":
        intervals: dict[int, list[tuple[float, float]]] = {}
        if cfg.trace:
            path = Path(cfg.trace)
            for line, row in enumerate(_read_csv(path, ("client", "from_s", "to_s")), start=2):
                c = _client(row, path, line, num_clients)
                start, end = _number(row, "from_s", path, line) or 0.0, _number(row, "to_s", path, line)
                if end is None or end <= start:
                    raise TraceError(f"{path}:{line}: to_s must be after from_s")
                intervals.setdefault(c, []).append((start, end))
        return cls(num_clients, seed, cfg.dropout, intervals)

    def online(self, client: int, t: float) -> bool:
        spans = self.intervals.get(client)
        return spans is None or any(a <= t < b for a, b in spans)

    def next_online(self, t: float) -> float:
        """The earliest time after ``t`` at which some client comes online (``t`` + 1 s when
        the trace holds none: the clock must move)."""
        starts = [a for spans in self.intervals.values() for a, _ in spans if a > t]
        return min(starts, default=t + 1.0)

    def drops(self, client: int, server_round: int) -> bool:
        """Whether this client drops mid-round (after its download, before its upload)."""
        if self.dropout <= 0:
            return False
        return bool(np.random.default_rng([self.seed, server_round, client, 0xD80]).random() < self.dropout)
