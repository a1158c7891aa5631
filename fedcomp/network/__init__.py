"""Bandwidth/latency models that turn bytes and compute seconds into simulated time."""

from fedcomp.network.model import ClientLink, NetworkModel, shared_mask_round_time

__all__ = ["ClientLink", "NetworkModel", "shared_mask_round_time"]
