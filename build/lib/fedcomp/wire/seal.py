"""Optional payload integrity: an HMAC-SHA256 tag per payload under a per-run key.

The frame's CRC-32 catches random corruption but not a deliberate or unlucky change with the
CRC recomputed; a keyed MAC catches both. The tag travels next to its payload (32 bytes,
counted with the payload's bytes). In simulation the key is derived from the run's seed unless
one is configured -- it is then a check of the wire, not a secret.
"""

from __future__ import annotations

import hashlib
import hmac

from fedcomp.wire.errors import PayloadError

TAG_BYTES = 32


class Seal:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("an HMAC key needs at least 16 bytes")
        self.key = key

    @classmethod
    def for_run(cls, seed: int, key_hex: str | None = None) -> "Seal":
        return cls(bytes.fromhex(key_hex) if key_hex else hashlib.sha256(f"fedcomp run key {seed}".encode()).digest())

    def tag(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()

    def check(self, payload: bytes, tag: bytes | None) -> None:
        if tag is None or not hmac.compare_digest(self.tag(payload), tag):
            raise PayloadError("payload authentication failed (HMAC-SHA256 tag missing or wrong)")
