"""The simulated clock: client profiles (links, device speed, availability), training compute
from FLOPs, codec time from a calibrated table, and when each client's round ends."""

from fedcomp.network.codec_time import CodecTimes, shipped_codec_times
from fedcomp.network.profiles import Availability, ClientProfile, Profiles, TraceError
from fedcomp.network.system import ClientWork, SystemModel, Timeline

__all__ = [
    "Availability", "ClientProfile", "ClientWork", "CodecTimes", "Profiles", "SystemModel", "Timeline", "TraceError",
    "shipped_codec_times",
]
