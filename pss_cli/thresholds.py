"""Torch-free threshold arithmetic shared by scan (core.metrics) and the gate."""

from __future__ import annotations


def stable_rank_floor(min_stable_rank: float, short_side: int, fraction: float) -> float:
    """The floor actually applied: never above `fraction` of the shape's rank (docs/DESIGN.md).

    A matrix can never exceed its short side, so tiny matrices get `fraction` of it (MiniLM's
    2 x 384 token-type embedding sits at 1.03 and is healthy).
    """
    return min(min_stable_rank, fraction * short_side)
