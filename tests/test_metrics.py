"""Metrics agree with scikit-learn and the paper's interpolation."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from ezmia.metrics import detection_threshold, labelled_metrics, point_metrics, tpr_at_fpr


@pytest.fixture
def separable_data():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    scores = np.r_[rng.normal(1.0, 1.0, 500), rng.normal(0.0, 1.0, 500)]
    return labels, scores


def test_auc_equals_scikit_learn(separable_data):
    labels, scores = separable_data
    assert point_metrics(labels, scores)["auc"] == pytest.approx(roc_auc_score(labels, scores))


def test_tpr_at_fpr_interpolates_the_roc_curve(separable_data):
    labels, scores = separable_data
    fpr, tpr, _ = roc_curve(labels, scores)
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(np.interp(0.01, fpr, tpr))
    assert point_metrics(labels, scores)["tpr_at_0_1pct_fpr"] == pytest.approx(
        np.interp(0.001, fpr, tpr)
    )


def test_bootstrap_intervals_bracket_the_point_estimate(separable_data):
    labels, scores = separable_data
    m = labelled_metrics(labels, scores, bootstrap_rounds=100)
    low, high = m["auc_ci95"]
    assert low < m["auc"] < high
    assert m["n"] == 1000 and m["n_members"] == 500


def test_metrics_ignore_rows_without_a_finite_score(separable_data):
    labels, scores = separable_data
    scores = scores.copy()
    scores[:10] = np.nan
    m = labelled_metrics(labels, scores, bootstrap_rounds=0)
    assert m["n"] == 990
    assert m["auc"] == pytest.approx(roc_auc_score(labels[10:], scores[10:]))


def test_detection_threshold_lets_through_the_chosen_fraction_of_non_members():
    calibration = np.arange(1000, dtype=float)
    threshold = detection_threshold(calibration, fpr=0.01)
    assert (calibration > threshold).mean() == pytest.approx(0.01, abs=0.001)
