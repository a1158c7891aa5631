"""The one error every decoder raises on bad input."""


class PayloadError(ValueError):
    """A payload is truncated, oversized, corrupted, or of an unknown version or codec."""
