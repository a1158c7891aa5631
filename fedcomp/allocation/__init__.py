"""Per-client compression budgets: DAGC (000_... Theorem 4, Algorithm 2) and the exact optimum."""

from fedcomp.allocation.dagc import dagc_phi, dagc_ratios, rescale_ratios

__all__ = ["dagc_phi", "dagc_ratios", "rescale_ratios"]
