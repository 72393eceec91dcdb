"""One client's influence on what the server computes, bounded by the others'."""

from __future__ import annotations

import numpy as np


def capped(values: list[float], ratio: float) -> list[float]:
    """Each value at most ``ratio`` times the median of the *others* (a lone value is kept).

    Leave-one-out, so one outlier cannot raise its own cap; a zero median caps nothing.
    """
    out = []
    for i, value in enumerate(values):
        others = values[:i] + values[i + 1:]
        reference = float(np.median(others)) if others else 0.0
        out.append(min(value, ratio * reference) if reference > 0 else value)
    return out
