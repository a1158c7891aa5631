"""The simulated clock: when each client's round ends, from bytes, FLOPs and profiles.

A client's round, from the server's send time t0 (``Timeline``)::

    downloaded = t0 + latency + 8 x down bytes / downlink + decode(down payload)
    trained    = downloaded + compute
    uploaded   = trained + encode(up payload) + latency + 8 x up bytes / uplink

compute = FLOPs per training sample x samples trained / device FLOP/s (``compute: flops``, the
default) or the host's measured seconds (``measured``); codec times come from the calibrated
table (``codec: model``), the client's own measurement (``measured``) or are left out
(``none``). Under HGC's shared mask a member compresses only once the mask, relayed after the
owner's upload, has reached it. The server decodes arrivals one at a time in arrival order
at ``server_gflops`` (``server_done``). Nothing here reads the host's clock unless asked to,
so the same run gives the same simulated time on every engine and under any load.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcomp.network.codec_time import CodecTimes, shipped_codec_times
from fedcomp.network.profiles import Availability, ClientProfile, Profiles

COMPUTE_MODES = ("flops", "measured")
CODEC_MODES = ("model", "measured", "none")


@dataclass(frozen=True)
class ClientWork:
    """One client's share of a round as the server learns it."""

    partition_id: int
    down_bytes: int
    down_codec: str
    up_bytes: int
    up_codec: str
    samples: int  # training samples processed (steps x batch)
    measured_compute_s: float = 0.0
    measured_encode_s: float = 0.0
    measured_decode_s: float = 0.0
    down_coded: int | None = None  # bytes of the down payload itself (its codec's work), if not all of down_bytes
    up_coded: int | None = None


@dataclass(frozen=True)
class Timeline:
    downloaded: float
    trained: float
    uploaded: float  # the upload has fully arrived at the server


class SystemModel:
    def __init__(
        self, profiles: Profiles, availability: Availability, d: int, flops_per_sample: float, *,
        compute: str = "flops", codec: str = "model", server_flops: float = 50e9, codec_times: CodecTimes | None = None,
    ) -> None:
        if compute not in COMPUTE_MODES or codec not in CODEC_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES} and codec one of {CODEC_MODES}")
        self.profiles, self.availability = profiles, availability
        self.d, self.flops_per_sample = d, flops_per_sample
        self.compute, self.codec, self.server_flops = compute, codec, server_flops
        self.codec_times = codec_times or shipped_codec_times()

    @classmethod
    def from_config(cls, cfg, num_clients: int, seed: int, d: int, flops_per_sample: float) -> "SystemModel":
        return cls(Profiles.from_config(cfg, num_clients, seed), Availability.from_config(cfg.availability, num_clients, seed),
                   d, flops_per_sample, compute=cfg.compute, codec=cfg.codec, server_flops=cfg.server_gflops * 1e9)

    def profile(self, partition_id: int, t: float) -> ClientProfile:
        return self.profiles.at(partition_id, t)

    def compute_s(self, work: ClientWork, profile: ClientProfile) -> float:
        if self.compute == "measured":
            return work.measured_compute_s
        return self.flops_per_sample * work.samples / profile.flops

    def codec_s(self, codec: str, way: str, nbytes: int, flops: float, measured: float = 0.0) -> float:
        if self.codec == "none":
            return 0.0
        if self.codec == "measured":
            return measured
        return self.codec_times.seconds(codec, way, self.d, nbytes, flops)

    def timeline(self, work: ClientWork, t0: float, mask_ready: float | None = None, mask_bytes: int = 0) -> Timeline:
        """When this client's download, training and upload end. ``mask_ready``: the time the
        server has the round's shared mask (HGC); ``mask_bytes`` of the downlink are that mask,
        relayed from then on, and the client may compress only once it has it."""
        p = self.profile(work.partition_id, t0)
        down_coded = (work.down_bytes if work.down_coded is None else work.down_coded) - mask_bytes
        up_coded = work.up_bytes if work.up_coded is None else work.up_coded
        downloaded = t0 + p.transfer_s(work.down_bytes - mask_bytes, "down") + self.codec_s(
            work.down_codec, "decode", down_coded, p.flops, work.measured_decode_s)
        trained = downloaded + self.compute_s(work, p)
        ready = trained if mask_ready is None else max(trained, mask_ready + p.transfer_s(mask_bytes, "down"))
        uploaded = ready + self.codec_s(work.up_codec, "encode", up_coded, p.flops, work.measured_encode_s) + p.transfer_s(work.up_bytes, "up")
        return Timeline(downloaded, trained, uploaded)

    def server_s(self, codec: str, way: str, nbytes: int) -> float:
        """The server's own codec time (encode the downlink, decode an upload)."""
        return 0.0 if self.codec != "model" else self.codec_times.seconds(codec, way, self.d, nbytes, self.server_flops)

    def server_done(self, arrivals: list[tuple[float, str, int]], start: float) -> float:
        """When the server has decoded every (arrival time, codec, bytes), one at a time in
        arrival order, having started no earlier than ``start``."""
        done = start
        for t, codec, nbytes in sorted(arrivals):
            done = max(done, t) + self.server_s(codec, "decode", nbytes)
        return done
