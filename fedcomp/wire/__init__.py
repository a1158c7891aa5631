"""Wire-level framing: the versioned, self-describing byte format every payload uses."""

from fedcomp.wire.errors import PayloadError
from fedcomp.wire.frame import Frame, pack_frame, unpack_frame

__all__ = ["Frame", "PayloadError", "pack_frame", "unpack_frame"]
