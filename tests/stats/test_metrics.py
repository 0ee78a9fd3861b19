"""Metrics against hand-built ROC curves with known answers, bootstrap intervals against
``np.percentile`` of the same resamples, and the detection threshold on small exact arrays."""

import numpy as np
import pytest
from sklearn.metrics import auc, roc_auc_score, roc_curve

from ezmia.report.model import ScoreMetrics
from ezmia.stats.metrics import (
    FPR_POINTS,
    bootstrap_intervals,
    detection_threshold,
    exact_interval,
    labelled_metrics,
    metric_label,
    min_nonmembers,
    operating_point,
    point_metrics,
    roc,
    tpr_at_fpr,
)

KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")


@pytest.fixture
def hand_roc():
    """200 non-members and 10 members whose ROC curve is known by hand.

    Non-members score 199, 198, 198, 196, 195, ..., 0. Members: four at 1000 (above every
    non-member), two tied with the non-member at 199, two tied with the two at 198, two at -1
    (below all). The curve's corners: (0, 0.4), (1/200, 0.6), (3/200, 0.8), (1, 0.8), (1, 1).
    """
    nonmembers = np.r_[199.0, 198.0, 198.0, np.arange(196.0, -1.0, -1.0)]
    members = np.r_[[1000.0] * 4, [199.0] * 2, [198.0] * 2, [-1.0] * 2]
    assert nonmembers.shape == (200,)
    labels = np.r_[np.ones(10, bool), np.zeros(200, bool)]
    return labels, np.r_[members, nonmembers]


@pytest.mark.parametrize("seed", range(40))
def test_roc_curve_and_auc_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    # Odd seeds: few distinct scores, so most rows tie; even seeds: continuous scores.
    scores = rng.integers(0, 1 + seed // 2, n).astype(float) if seed % 2 else rng.normal(size=n)
    expected_fprs, expected_tprs, _ = roc_curve(labels.astype(int), scores)
    fprs, tprs = roc(labels.astype(int), scores)
    np.testing.assert_array_equal(fprs, expected_fprs)
    np.testing.assert_array_equal(tprs, expected_tprs)
    assert point_metrics(labels, scores)["auc"] == auc(expected_fprs, expected_tprs)


@pytest.mark.parametrize(
    ("labels", "scores", "fprs", "tprs"),
    [
        # Three corners on one line: the middle one is dropped.
        ([1, 0, 1, 0, 1, 0], [3, 3, 2, 2, 1, 1], [0, 1 / 3, 1], [0, 1 / 3, 1]),
        ([1, 0, 1, 0], [3.0, 2.0, 2.0, 1.0], [0, 0, 0.5, 1], [0, 0.5, 1, 1]),
        ([1, 1, 0, 0], [4.0, 3.0, 2.0, 1.0], [0, 0, 0, 1], [0, 0.5, 1, 1]),
        ([0, 1], [1.0, 1.0], [0, 1], [0, 1]),
    ],
)
def test_roc_keeps_corners_and_drops_collinear_points(labels, scores, fprs, tprs):
    got = roc(np.array(labels), np.array(scores, dtype=float))
    np.testing.assert_array_equal(got[0], fprs)
    np.testing.assert_array_equal(got[1], tprs)


def test_fpr_points_are_one_and_a_tenth_percent():
    assert FPR_POINTS == {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}


def test_auc_of_a_hand_built_roc_counts_ties_as_half(hand_roc):
    # Pairs won: 4 x 200 + 2 x (199 + 0.5) + 2 x (197 + 2 x 0.5) = 1595 of 10 x 200.
    assert point_metrics(*hand_roc)["auc"] == pytest.approx(1595 / 2000, abs=1e-12)


def test_tpr_at_one_percent_fpr_interpolates_between_roc_corners(hand_roc):
    # Between (0.005, 0.6) and (0.015, 0.8): halfway.
    assert point_metrics(*hand_roc)["tpr_at_1pct_fpr"] == pytest.approx(0.7, abs=1e-12)
    assert tpr_at_fpr(*hand_roc, 0.01) == pytest.approx(0.7, abs=1e-12)


def test_tpr_at_a_tenth_percent_fpr_interpolates_from_the_zero_fpr_corner(hand_roc):
    # Between (0, 0.4) and (0.005, 0.6): a fifth of the way.
    assert point_metrics(*hand_roc)["tpr_at_0_1pct_fpr"] == pytest.approx(0.44, abs=1e-12)


def test_tpr_read_exactly_on_a_corner(hand_roc):
    assert tpr_at_fpr(*hand_roc, 0.015) == pytest.approx(0.8, abs=1e-12)
    assert tpr_at_fpr(*hand_roc, 0.0) == pytest.approx(0.4, abs=1e-12)
    assert tpr_at_fpr(*hand_roc, 0.5) == pytest.approx(0.8, abs=1e-12)  # flat to (1, 0.8)


def test_perfect_separation_gives_one_everywhere_with_a_degenerate_interval():
    labels = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    scores = np.r_[np.arange(10.0, 15.0), np.arange(5.0)]
    assert point_metrics(labels, scores) == pytest.approx({k: 1.0 for k in KEYS}, abs=1e-12)
    intervals = bootstrap_intervals(labels, scores, rounds=30)
    assert set(intervals) == set(KEYS)
    for interval in intervals.values():
        assert interval == pytest.approx([1.0, 1.0], abs=1e-12)


def test_inverted_scores_give_auc_zero():
    labels = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    scores = np.r_[np.arange(5.0), np.arange(10.0, 15.0)]
    m = point_metrics(labels, scores)
    assert (m["auc"], m["tpr_at_1pct_fpr"], m["tpr_at_0_1pct_fpr"]) == (0.0, 0.0, 0.0)


@pytest.fixture
def hand_roc_1000():
    """1000 non-members (enough to resolve a 0.1% FPR) and 10 members, ROC known by hand.

    Non-members score 999, 998, 997, 996, 995, ten at 990, then 985, 984, ..., 1. Members:
    four at 5000, two tied with the non-member at 999, two tied with the ten at 990, two at
    -1. Corners: (0, 0.4), (0.001, 0.6), (0.005, 0.6), (0.015, 0.8), (1, 0.8), (1, 1).
    """
    nonmembers = np.r_[999.0, 998.0, 997.0, 996.0, 995.0, [990.0] * 10, np.arange(985.0, 0.0, -1)]
    members = np.r_[[5000.0] * 4, [999.0] * 2, [990.0] * 2, [-1.0] * 2]
    assert nonmembers.shape == (1000,)
    return np.r_[np.ones(10, bool), np.zeros(1000, bool)], np.r_[members, nonmembers]


def test_labelled_metrics_report_every_metric_with_its_interval_and_counts(hand_roc_1000):
    m = labelled_metrics(*hand_roc_1000, bootstrap_rounds=5)
    assert {"n", "n_members", *KEYS, *(f"{k}_ci95" for k in KEYS)} <= set(m)
    assert (m["n"], m["n_members"]) == (1010, 10)
    # Pairs won: 4 x 1000 + 2 x (999 + 0.5) + 2 x (985 + 10 x 0.5) = 7979 of 10 x 1000.
    assert m["auc"] == pytest.approx(0.7979, abs=1e-12)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.7, abs=1e-12)  # halfway along the tie
    assert m["tpr_at_0_1pct_fpr"] == pytest.approx(0.6, abs=1e-12)  # on the first corner
    for name in KEYS:
        low, high = m[f"{name}_ci95"]
        assert 0.0 <= low <= high <= 1.0


def resampled_metrics(labels, scores, rounds, seed):
    """The bootstrap's resamples drawn again (same generator, same order), each scored with
    scikit-learn's AUC and the ROC read at each FPR point; one-class resamples skipped."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {k: [] for k in KEYS}
    for _ in range(rounds):
        pick = rng.integers(0, labels.shape[0], labels.shape[0])
        if len(set(labels[pick].tolist())) < 2:
            continue
        values["auc"].append(roc_auc_score(labels[pick], scores[pick]))
        for name, fpr in FPR_POINTS.items():
            values[name].append(tpr_at_fpr(labels[pick], scores[pick], fpr))
    return values


def test_bootstrap_interval_is_the_central_95_percent_of_the_resamples(hand_roc_1000):
    labels, scores, seed = *hand_roc_1000, 7
    m = labelled_metrics(labels, scores, bootstrap_rounds=40, seed=seed)
    intervals = bootstrap_intervals(labels, scores, 40, seed)
    for name, values in resampled_metrics(labels, scores, 40, seed).items():
        assert len(values) == 40
        expected = np.percentile(values, [2.5, 97.5])
        np.testing.assert_allclose(intervals[name], expected, rtol=0, atol=1e-12)
        assert not np.allclose(np.percentile(values, [5, 95]), expected)  # the level matters
        if m[name] is not None:  # resolved: reported with its interval
            np.testing.assert_allclose(m[f"{name}_ci95"], expected, rtol=0, atol=1e-12)


def test_bootstrap_skips_resamples_with_one_class():
    # One member in six rows: about a third of the resamples hold no member.
    labels = np.array([1, 0, 0, 0, 0, 0], bool)
    scores = np.array([0.5, 0.1, 0.9, 0.2, 0.3, 0.4])
    values = resampled_metrics(labels, scores, 100, 3)
    assert 40 < len(values["auc"]) < 90
    intervals = bootstrap_intervals(labels, scores, 100, seed=3)
    np.testing.assert_allclose(intervals["auc"], np.percentile(values["auc"], [2.5, 97.5]))


def test_bootstrap_interval_level_is_a_parameter(hand_roc):
    labels, scores = hand_roc
    values = resampled_metrics(labels, scores, 40, 1)["auc"]
    interval = bootstrap_intervals(labels, scores, 40, seed=1, level=0.8)["auc"]
    np.testing.assert_allclose(interval, np.percentile(values, [10, 90]), atol=1e-12)


def test_metrics_ignore_rows_without_a_finite_score(hand_roc):
    labels, scores = hand_roc
    scores = np.r_[scores, np.nan, np.inf, -np.inf]
    labels = np.r_[labels, True, False, True]
    m = labelled_metrics(labels, scores, bootstrap_rounds=0)
    assert (m["n"], m["n_members"]) == (210, 10)
    assert m["auc"] == pytest.approx(0.7975, abs=1e-12)


def test_integer_labels_count_as_membership():
    labels = np.array([1, 1, 0, 0])
    m = labelled_metrics(labels, np.array([4.0, 1.0, 2.0, 3.0]), bootstrap_rounds=0)
    assert (m["n_members"], m["auc"]) == (2, 0.5)


@pytest.mark.parametrize(
    ("calibration", "fpr", "threshold"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.25, 4.0),  # quantile 0.75 lands on the 4th value
        ([1.0, 2.0, 3.0, 4.0, 5.0], 0.125, 4.5),  # quantile 0.875: halfway from 4 to 5
        ([0.0, 1.0, 1.0, 1.0, 2.0], 0.5, 1.0),  # median inside a run of ties
        ([0.0, 1.0, 1.0, 1.0, 2.0], 0.1, 1.6),  # quantile 0.9: 60% of the way from 1 to 2
        ([3.0, 3.0, 3.0, 3.0], 0.01, 3.0),  # all tied
        ([np.nan, 0.0, 1.0, 2.0, np.inf, 3.0, 4.0], 0.25, 3.0),  # non-finite ignored
    ],
)
def test_detection_threshold_on_small_exact_arrays(calibration, fpr, threshold):
    assert detection_threshold(np.array(calibration), fpr) == pytest.approx(threshold, abs=1e-12)


def test_detection_threshold_lets_through_the_chosen_fraction_of_non_members():
    calibration = np.arange(1001, dtype=float)
    threshold = detection_threshold(calibration, fpr=0.01)
    assert threshold == pytest.approx(990.0)
    assert (calibration > threshold).sum() == 10


def test_default_bootstrap_is_200_rounds_from_seed_0():
    labels = np.arange(60) % 2 == 0
    scores = np.random.default_rng(5).normal(size=60) + labels
    m = labelled_metrics(labels, scores)
    assert m == labelled_metrics(labels, scores, bootstrap_rounds=200, seed=0)
    assert m["auc_ci95"] != labelled_metrics(labels, scores, 201, seed=0)["auc_ci95"]
    assert m["auc_ci95"] != labelled_metrics(labels, scores, 200, seed=1)["auc_ci95"]
    assert bootstrap_intervals(labels, scores, 20) == bootstrap_intervals(labels, scores, 20, 0)
    assert bootstrap_intervals(labels, scores, 20) != bootstrap_intervals(labels, scores, 20, 1)


@pytest.mark.parametrize(
    ("fpr", "needed"), [(0.01, 100), (0.001, 1000), (0.05, 20), (0.3, 4), (0.5, 2), (1 / 3, 3)]
)
def test_an_fpr_needs_its_reciprocal_in_non_members_rounded_up(fpr, needed):
    assert min_nonmembers(fpr) == needed


def test_a_tpr_the_non_members_cannot_resolve_is_null_with_an_upper_bound(hand_roc):
    # 200 non-members resolve 1% (needs 100) but not 0.1% (needs 1000); the bound is the TPR
    # at 1/200, the corner (0.005, 0.6).
    m = labelled_metrics(*hand_roc, bootstrap_rounds=5)
    assert m["n_nonmembers"] == 200
    assert (m["tpr_at_0_1pct_fpr"], m["tpr_at_0_1pct_fpr_ci95"]) == (None, None)
    assert m["unresolved"] == {
        "tpr_at_0_1pct_fpr": {
            "fpr": 0.001,
            "needs_nonmembers": 1000,
            "upper_bound": pytest.approx(0.6, abs=1e-12),
            "upper_bound_at_fpr": 0.005,
        }
    }
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.7, abs=1e-12)
    assert len(m["tpr_at_1pct_fpr_ci95"]) == 2
    assert ScoreMetrics(**m).bounded("tpr_at_0_1pct_fpr") == pytest.approx(0.6, abs=1e-12)
    assert ScoreMetrics(**m).bounded("tpr_at_1pct_fpr") == pytest.approx(0.7, abs=1e-12)
    assert ScoreMetrics(**m).bounded("auc") == pytest.approx(0.7975, abs=1e-12)
    assert set(m["operating_points"]) == {"tpr_at_1pct_fpr"}


@pytest.mark.parametrize(("n_nonmembers", "resolved"), [(99, False), (100, True), (101, True)])
def test_one_percent_fpr_is_resolved_from_exactly_100_non_members(n_nonmembers, resolved):
    labels = np.r_[np.ones(3, bool), np.zeros(n_nonmembers, bool)]
    scores = np.r_[[1000.0, 1001.0, -1.0], np.arange(float(n_nonmembers))]
    m = labelled_metrics(labels, scores, bootstrap_rounds=0)
    assert (m["tpr_at_1pct_fpr"] is not None) == resolved
    assert ("tpr_at_1pct_fpr" in m["unresolved"]) == (not resolved)
    assert ("tpr_at_1pct_fpr" in m["operating_points"]) == resolved
    assert ScoreMetrics(**m).bounded("tpr_at_1pct_fpr") == pytest.approx(2 / 3, abs=1e-12)


def test_operating_points_flag_scores_strictly_above_the_threshold(hand_roc_1000):
    labels, scores = hand_roc_1000
    # 1%: 10 false positives allowed; the 11th highest non-member score is one of the ten at
    # 990, so only the five above 990 are flagged, with the six members above it.
    one = operating_point(labels, scores, 0.01)
    assert {k: one[k] for k in ("threshold", "tp", "fp", "n_members", "n_nonmembers")} == {
        "threshold": 990.0,
        "tp": 6,
        "fp": 5,
        "n_members": 10,
        "n_nonmembers": 1000,
    }
    assert (one["tpr"], one["fpr"]) == (0.6, 0.005)
    assert one["tpr_exact_ci95"] == exact_interval(6, 10)
    assert one["fpr_exact_ci95"] == exact_interval(5, 1000)
    tenth = operating_point(labels, scores, 0.001)  # one allowed: threshold 998
    assert (tenth["threshold"], tenth["tp"], tenth["fp"]) == (998.0, 6, 1)
    assert labelled_metrics(labels, scores, 0)["operating_points"] == {
        "tpr_at_1pct_fpr": one,
        "tpr_at_0_1pct_fpr": tenth,
    }


def test_an_operating_point_allowing_every_non_member_flags_everything():
    point = operating_point(np.array([True, False]), np.array([0.0, 1.0]), 1.0)
    assert (point["threshold"], point["tp"], point["fp"]) == (-np.inf, 1, 1)


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [
        (0, 10, [0.0, 1 - 0.025**0.1]),  # closed form at 0: 1 - (alpha/2)^(1/n)
        (10, 10, [0.025**0.1, 1.0]),
        (0, 1, [0.0, 0.975]),
        (1, 1, [0.025, 1.0]),
        (5, 10, [0.187086, 0.812914]),  # the textbook Clopper-Pearson interval of 5/10
    ],
)
def test_exact_interval_is_clopper_pearson(successes, trials, expected):
    assert exact_interval(successes, trials) == pytest.approx(expected, abs=1e-6)


def test_exact_interval_level_is_a_parameter():
    assert exact_interval(0, 10, level=0.9) == pytest.approx([0.0, 1 - 0.05**0.1], abs=1e-12)


def test_metric_labels_name_the_rate():
    assert [metric_label(m) for m in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")] == [
        "AUC",
        "TPR @ 1% FPR",
        "TPR @ 0.1% FPR",
    ]


def test_bounded_value_of_metrics_without_unresolved_rates_is_the_metric():
    m = ScoreMetrics(n=2, n_members=1, auc=0.5, tpr_at_1pct_fpr=0.25)
    assert m.bounded("tpr_at_1pct_fpr") == 0.25
