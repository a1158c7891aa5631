"""Per-round sparsification ratio for HGC (and DGC): warm-up and LR-step adjustment."""

from __future__ import annotations


def warmup_ratio(server_round: int, target: float, warmup_rounds: int, start: float = 0.25) -> float:
    """Exponential warm-up (HGC Sec. 5; DGC Sec. 3.4): the ratio falls geometrically from
    ``start`` in round 1 to ``target`` in round ``warmup_rounds`` + 1 and stays there."""
    if warmup_rounds <= 0 or target >= start:
        return target
    progress = min(1.0, (server_round - 1) / warmup_rounds)
    return start * (target / start) ** progress


def lr_step_adjusted_ratio(
    server_round: int, ratio: float, lr_steps: list[int], window: int, factor: float,
) -> float:
    """HGC Sec. 3.2: within ``window`` rounds before and after each learning-rate step, send
    ``factor`` times more coordinates (capped at all of them)."""
    if window > 0 and any(abs(server_round - s) <= window for s in lr_steps):
        return min(1.0, ratio * factor)
    return ratio
