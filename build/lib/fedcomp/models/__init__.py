"""Model zoo and the flat-vector view of a model's state that crosses the wire."""

from fedcomp.models.layout import StateLayout
from fedcomp.models.zoo import build_model

__all__ = ["StateLayout", "build_model"]
