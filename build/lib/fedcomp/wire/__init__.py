"""Wire-level framing: the versioned, self-describing byte format every payload uses."""

from fedcomp.wire.errors import PayloadError
from fedcomp.wire.frame import Frame, frame_codec, pack_frame, unpack_frame
from fedcomp.wire.seal import Seal

__all__ = ["Frame", "PayloadError", "Seal", "frame_codec", "pack_frame", "unpack_frame"]
