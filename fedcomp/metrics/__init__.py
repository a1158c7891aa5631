"""What a run writes: per-round metrics, the partition, and a summary."""

from fedcomp.metrics.records import ClientRound, RoundStats
from fedcomp.metrics.recorder import MetricsRecorder

__all__ = ["ClientRound", "MetricsRecorder", "RoundStats"]
