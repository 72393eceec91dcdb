"""Label-balanced client weighting (``client-weighting=label-balanced``).

Under label skew a round's few sampled clients hold a label mix far from the federation's, and
their average moves the experts as training on that mix would. Here each training reply carries its
partition's label counts (``label-counts``); the server keeps every client's latest counts and weighs
a round's replies so that their weighted label mix is the federation's (pooled over every client
seen so far), as close to equal weights as that allows. Where no weighting reaches the federation's
mix (every sampled client leans the same way), the closest one is taken. Clients reveal their label
histograms to the server, as the statistics of FedLC or CCVR do; nothing else changes on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize

LABEL_COUNTS = "label-counts"
_TOLERANCE = 1e-12  # squared label-mix mismatch treated as "as close as any weighting gets"


def counts_problem(value: Any, num_labels: int) -> str | None:
    """Why a reply's ``label-counts`` is unusable, or None."""
    if (
        not isinstance(value, list)
        or len(value) != num_labels
        or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0
               for c in value)
        or sum(value) <= 0
    ):
        return f"'{LABEL_COUNTS}' must be {num_labels} non-negative counts with a positive sum, got {value!r}"
    return None


def balanced_weights(mixes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Weights on the simplex whose mix ``weights @ mixes`` is closest to ``target`` and, among
    those, closest to uniform.

    Args:
        mixes: (clients, labels) each client's label frequencies (rows sum to 1).
        target: (labels,) the label frequencies to reach.
    """
    n = len(mixes)
    uniform = np.full(n, 1.0 / n)
    bounds, simplex = [(0.0, 1.0)] * n, {"type": "eq", "fun": lambda w: w.sum() - 1.0}
    options = {"ftol": 1e-14, "maxiter": 500}

    def mismatch(w: np.ndarray) -> float:
        return float(np.sum((w @ mixes - target) ** 2))

    closest = minimize(mismatch, uniform, method="SLSQP", bounds=bounds, constraints=[simplex], options=options)
    floor = mismatch(closest.x)
    if mismatch(uniform) <= floor + _TOLERANCE:
        return uniform
    # Every weighting at the floor has the same mix (the target's projection onto the clients' mixes'
    # hull is unique), so the second problem is linear-constrained: that mix, less one label, which
    # the simplex constraint already fixes (a redundant equality would make SLSQP's system singular).
    reached = closest.x @ mixes
    fits = {"type": "eq", "fun": lambda w: w @ mixes[:, :-1] - reached[:-1], "jac": lambda w: mixes[:, :-1].T}
    nearest = minimize(lambda w: float(np.sum((w - uniform) ** 2)), closest.x, jac=lambda w: 2 * (w - uniform),
                       method="SLSQP", bounds=bounds, constraints=[simplex, fits], options=options)
    weights = np.clip(nearest.x if nearest.success else closest.x, 0.0, None)
    return weights / weights.sum()


class LabelMix:
    """Every client's latest label counts and the federation's pooled label frequencies."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self._counts: dict[int, np.ndarray] = {}

    def record(self, node: int, counts: Sequence[float]) -> None:
        self._counts[node] = np.asarray(counts, dtype=np.float64)

    def federation_mix(self) -> np.ndarray:
        pooled = np.sum(list(self._counts.values()), axis=0)
        return pooled / pooled.sum()

    def weights(self, replies: Sequence[tuple[int, Sequence[float]]]) -> np.ndarray:
        """The replies' weights (node id, label counts each), summing to the number of replies,
        after recording their counts."""
        for node, counts in replies:
            self.record(node, counts)
        mixes = np.array([np.asarray(c, dtype=np.float64) / sum(c) for _, c in replies])
        return len(replies) * balanced_weights(mixes, self.federation_mix())
