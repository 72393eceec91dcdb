"""GLUE metrics in plain numpy: accuracy, binary F1, Matthews correlation, Pearson and Spearman.

Degenerate inputs (a constant prediction, a single class) give 0.0 rather than NaN, as scikit-learn
does for MCC, so that "higher is better" comparisons between checkpoints stay well defined.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from adamix_zoo.glue_tasks import TaskSpec


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1(pred: np.ndarray, label: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class (GLUE's MRPC and QQP convention)."""
    pred, label = np.asarray(pred) == positive, np.asarray(label) == positive
    tp = float(np.sum(pred & label))
    denom = float(np.sum(pred) + np.sum(label))
    return 2.0 * tp / denom if denom else 0.0


def mcc(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, as scikit-learn)."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = np.union1d(pred, label)
    conf = np.array([[np.sum((label == t) & (pred == p)) for p in classes] for t in classes], float)
    t_sum, p_sum = conf.sum(1), conf.sum(0)  # true / predicted counts per class
    n, correct = conf.sum(), np.trace(conf)
    cov_tp = correct * n - t_sum @ p_sum
    cov_pp, cov_tt = n * n - p_sum @ p_sum, n * n - t_sum @ t_sum
    denom = np.sqrt(cov_pp * cov_tt)
    return float(cov_tp / denom) if denom else 0.0


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
    x, y = np.asarray(pred, float), np.asarray(label, float)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), float)
    start = 0
    for end in range(1, len(values) + 1):  # close a run of equal values at each change
        if end == len(values) or sorted_vals[end] != sorted_vals[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def spearman(pred: np.ndarray, label: np.ndarray) -> float:
    return pearson(rank(pred), rank(label))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def predictions(logits: np.ndarray, problem: str) -> np.ndarray:
    """logits (n, num_labels) -> class ids (n,), or scores (n,) for regression."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if problem == "regression" else logits.argmax(-1)


def compute_metrics(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of ``task`` from raw head outputs (n, num_labels) and gold labels (n,)."""
    pred = predictions(logits, task.problem)
    return {name: METRICS[name](pred, np.asarray(labels)) for name in task.metrics}
