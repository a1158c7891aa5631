"""Compressors: tensor -> real bytes -> tensor.

``build(name, **params)`` returns a registered compressor; Hydra configs reach the same
function through ``fedcomp/conf/compressor/*.yaml`` (``_target_: fedcomp.compression.build``).
"""

from fedcomp.compression.base import Compressor
from fedcomp.compression.registry import build, register, registered
from fedcomp.wire.errors import PayloadError

__all__ = ["Compressor", "PayloadError", "build", "register", "registered"]
