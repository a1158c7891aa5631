"""Bandwidth/latency models that turn bytes and compute seconds into simulated time."""

from fedcomp.network.model import ClientLink, NetworkModel

__all__ = ["ClientLink", "NetworkModel"]
