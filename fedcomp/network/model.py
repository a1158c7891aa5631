"""Per-client links and the synchronous round-time model.

A synchronous round ends when its slowest sampled client is done:

    round_time = max_i [ latency_i + 8 * down_bytes_i / downlink_bps_i
                         + compute_s_i * compute_scale * speed_factor_i
                         + latency_i + 8 * up_bytes_i / uplink_bps_i ]

The server's own link is assumed not to be the bottleneck (each client has its own path).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClientLink:
    uplink_bps: float
    downlink_bps: float
    latency_s: float
    speed_factor: float = 1.0

    def round_time(self, up_bytes: int, down_bytes: int, compute_s: float, compute_scale: float = 1.0) -> float:
        return (
            2 * self.latency_s
            + 8.0 * down_bytes / self.downlink_bps
            + compute_s * compute_scale * self.speed_factor
            + 8.0 * up_bytes / self.uplink_bps
        )


@dataclass(frozen=True)
class NetworkModel:
    links: tuple[ClientLink, ...]
    compute_scale: float = 1.0

    @classmethod
    def from_config(cls, cfg, num_clients: int, seed: int) -> "NetworkModel":
        base = ClientLink(cfg.uplink_mbps * 1e6, cfg.downlink_mbps * 1e6, cfg.latency_ms / 1e3)
        het = cfg.heterogeneity
        if het.kind == "none":
            links = [base] * num_clients
        elif het.kind == "lognormal":
            # Mean-one factors, so the preset stays the average link.
            rng = np.random.default_rng([seed, 0x4E7])
            up, down = rng.lognormal(-het.sigma**2 / 2, het.sigma, size=(2, num_clients))
            links = [
                ClientLink(base.uplink_bps * u, base.downlink_bps * d, base.latency_s)
                for u, d in zip(up, down)
            ]
        else:
            links = _links_from_csv(Path(het.path), base, num_clients)
        return cls(tuple(links), cfg.compute_scale)

    def round_time(self, per_client: dict[int, tuple[int, int, float]]) -> float:
        """``per_client``: partition id -> (up_bytes, down_bytes, compute_s)."""
        return max(
            (self.links[c].round_time(u, d, s, self.compute_scale) for c, (u, d, s) in per_client.items()),
            default=0.0,
        )


def shared_mask_round_time(
    owner: tuple[ClientLink, int, int, float],
    members: list[tuple[ClientLink, int, int, float]],
    mask_bytes: int,
    compute_scale: float = 1.0,
) -> float:
    """A round in which one client (the owner) must finish before the others may compress
    (HGC's shared mask). Each party is (link, up_bytes, down_bytes, compute_s); a member's
    down_bytes include the ``mask_bytes`` relayed to it. Members train while the owner works
    but compress only once the mask, relayed after the owner's upload, has reached them."""
    link, up, down, compute = owner
    t_mask = link.round_time(up, down, compute, compute_scale)
    finish = t_mask
    for link, up, down, compute in members:
        trained = link.latency_s + 8.0 * (down - mask_bytes) / link.downlink_bps + compute * compute_scale * link.speed_factor
        mask_in = t_mask + link.latency_s + 8.0 * mask_bytes / link.downlink_bps
        finish = max(finish, max(trained, mask_in) + link.latency_s + 8.0 * up / link.uplink_bps)
    return finish


def _links_from_csv(path: Path, base: ClientLink, num_clients: int) -> list[ClientLink]:
    if not path.is_file():
        raise FileNotFoundError(f"network.heterogeneity.path: no file {path}")
    links = [base] * num_clients
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            c = int(row["client"])
            if not 0 <= c < num_clients:
                raise ValueError(f"{path}: client {c} outside 0..{num_clients - 1}")
            links[c] = ClientLink(
                float(row["uplink_mbps"]) * 1e6 if row.get("uplink_mbps") else base.uplink_bps,
                float(row["downlink_mbps"]) * 1e6 if row.get("downlink_mbps") else base.downlink_bps,
                float(row["latency_ms"]) / 1e3 if row.get("latency_ms") else base.latency_s,
                float(row["speed_factor"]) if row.get("speed_factor") else 1.0,
            )
    return links
