"""Checks of numeric arguments shared by the estimators and the baselines: one rule and one message
for each kind of number, naming the argument, what it must be and what it was."""

from __future__ import annotations

import math


def int_at_least(name: str, value, minimum: int = 1) -> int:
    """``value`` when it is an integer (not a bool) of at least ``minimum``; else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def positive(name: str, value) -> float:
    """``value`` as a float when it is a finite number > 0 (not a bool); else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
