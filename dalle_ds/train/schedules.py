"""Annealing schedules for the relaxation temperature and the KL weight (paper Appendix A.2: cosine schedules)."""
from __future__ import annotations

import math


def cosine_anneal(step: int, start: float, end: float, steps: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ≥ ``steps``); ``steps == 0`` means already at ``end``."""
    if steps <= 0 or step >= steps:
        return end
    t = max(step, 0) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
