"""Resolvable rates and the attack's operating point with exact intervals, on hand-built
cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from ezmia.stats.metrics import exact_interval, min_nonmembers, operating_point


@pytest.mark.parametrize(("fpr", "needed"), [(0.01, 100), (0.001, 1000), (0.05, 20), (0.3, 4)])
def test_a_rate_needs_at_least_its_inverse_in_non_members(fpr, needed):
    assert min_nonmembers(fpr) == needed


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (7, 1000), (500, 1000)])
def test_exact_intervals_are_clopper_pearson(k, n):
    want = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert exact_interval(k, n) == pytest.approx([want.low, want.high], abs=1e-12)


def test_the_operating_point_flags_at_most_the_allowed_non_members_with_ties():
    # 10 non-members; at FPR 0.2, two may be flagged: scores above the third largest (0.7).
    nonmembers = [0.9, 0.8, 0.7, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    members = [0.95, 0.85, 0.7, 0.75, 0.6]
    labels = np.array([False] * 10 + [True] * 5)
    point = operating_point(labels, np.array(nonmembers + members), 0.2)
    assert point["threshold"] == 0.7
    assert (point["fp"], point["tp"]) == (2, 3)  # 0.7 itself is not above the threshold
    assert point["fpr"] == 0.2 and point["tpr"] == 0.6
    assert point["tpr_exact_ci95"] == exact_interval(3, 5)
    assert point["fpr_exact_ci95"] == exact_interval(2, 10)


def test_below_resolution_no_non_member_may_be_flagged():
    labels = np.array([False] * 5 + [True] * 2)
    point = operating_point(labels, np.array([1, 2, 3, 4, 5, 6, 5.0]), 0.1)
    assert point["threshold"] == 5.0 and point["fp"] == 0 and point["tp"] == 1
