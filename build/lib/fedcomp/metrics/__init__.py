"""What a run writes: per-round metrics, the partition, and a summary."""

from fedcomp.metrics.recorder import MetricsRecorder
from fedcomp.metrics.records import ClientRound, RoundStats

__all__ = ["ClientRound", "MetricsRecorder", "RoundStats"]
