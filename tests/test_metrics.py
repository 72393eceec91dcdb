"""Metrics agree with scikit-learn and scipy on fixed inputs, including ties and degenerate cases."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from adamix_zoo.glue_tasks import get_task
from adamix_zoo.metrics import accuracy, compute_metrics, f1, mcc, pearson, rank, spearman

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2, 200)
PRED = np.where(RNG.random(200) < 0.7, LABELS, 1 - LABELS)
Y3, P3 = RNG.integers(0, 3, 150), RNG.integers(0, 3, 150)
SCORES = RNG.normal(size=300)
TARGET = 0.6 * SCORES + RNG.normal(size=300)


def test_classification_metrics_match_sklearn():
    assert accuracy(PRED, LABELS) == pytest.approx(skm.accuracy_score(LABELS, PRED))
    assert f1(PRED, LABELS) == pytest.approx(skm.f1_score(LABELS, PRED))
    assert mcc(PRED, LABELS) == pytest.approx(skm.matthews_corrcoef(LABELS, PRED))
    assert mcc(P3, Y3) == pytest.approx(skm.matthews_corrcoef(Y3, P3))  # multi-class


def test_correlations_match_scipy_with_ties():
    assert pearson(SCORES, TARGET) == pytest.approx(stats.pearsonr(SCORES, TARGET)[0])
    tied_x, tied_y = np.round(SCORES, 1), np.round(TARGET * 2) / 2  # many ties on both sides
    assert spearman(tied_x, tied_y) == pytest.approx(stats.spearmanr(tied_x, tied_y)[0])
    np.testing.assert_allclose(rank(tied_x), stats.rankdata(tied_x))


def test_degenerate_inputs_give_zero_not_nan():
    const = np.zeros(10)
    assert pearson(const, np.arange(10)) == 0.0
    assert spearman(const, np.arange(10)) == 0.0
    assert mcc(np.ones(10, int), np.ones(10, int)) == 0.0
    assert f1(np.zeros(4, int), np.zeros(4, int)) == 0.0


def test_compute_metrics_from_logits():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.0, 5.0], [3.0, 1.0]])
    labels = np.array([0, 1, 0, 0])
    out = compute_metrics(get_task("mrpc"), logits, labels)
    assert out == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.75)}
    reg = compute_metrics(get_task("stsb"), SCORES[:, None], TARGET)
    assert reg["pearson"] == pytest.approx(stats.pearsonr(SCORES, TARGET)[0])
    assert reg["spearman"] == pytest.approx(stats.spearmanr(SCORES, TARGET)[0])
