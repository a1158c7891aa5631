"""fedcomp: simulate communication-efficient federated learning with real payloads."""

__version__ = "0.1.0"
