"""The empirical epsilon lower bound against closed forms and known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from ezmia.stats.epsilon import audit_epsilon, epsilon_from_rates, epsilon_lower_bound


def test_a_perfect_attack_refutes_the_closed_form_epsilon():
    """All n members flagged, no non-member: exact bounds (a/2)^(1/n) and 1 - (a/2)^(1/n)."""
    n, delta = 100, 1e-5
    low = 0.025 ** (1 / n)
    expected = math.log((low - delta) / (1 - low))
    assert epsilon_lower_bound(n, n, 0, n, delta, 0.95) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(3.2813, abs=1e-4)


def test_the_bound_uses_exact_binomial_ends_of_both_rates():
    tp, fp, n, delta = 600, 12, 1000, 1e-5
    tpr_low = binomtest(tp, n).proportion_ci(0.95, method="exact").low
    fpr_high = binomtest(fp, n).proportion_ci(0.95, method="exact").high
    expected = max(
        math.log((tpr_low - delta) / fpr_high), math.log((1 - fpr_high - delta) / (1 - tpr_low))
    )
    assert epsilon_lower_bound(tp, n, fp, n, delta, 0.95) == pytest.approx(expected, rel=1e-9)


def test_rates_that_dp_allows_refute_nothing():
    assert epsilon_from_rates(0.01, 0.02, 1e-5) == 0.0
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0
    assert epsilon_from_rates(3e-5, 1e-5, 1e-5) == pytest.approx(math.log(2))
    assert epsilon_from_rates(0.3, 0.1, 0.0) == pytest.approx(math.log(3))


def test_a_separating_score_gives_a_positive_bound_measured_on_the_held_out_half():
    labels = np.array([True] * 1000 + [False] * 1000)
    scores = np.where(labels, 1.0, 0.0) + np.linspace(0, 0.5, 2000)
    result = audit_epsilon(labels, {"s": scores}, seed=0)
    assert result["n_members"] + result["n_nonmembers"] == 1000  # one half only
    assert result["fp"] == 0 and result["tp"] >= 0.99 * result["n_members"]
    counts = {k: result[k] for k in ("tp", "n_members", "fp", "n_nonmembers")}
    assert result["epsilon_lower_bound"] == epsilon_lower_bound(**counts, delta=1e-5,
                                                                confidence=0.95)  # fmt: skip
    assert result["epsilon_lower_bound"] > 4  # ~ln(0.99 / 0.007) at 500 rows a class
    assert result["score"] == "s"


def test_the_attack_is_chosen_among_scores_on_the_held_out_half():
    labels = np.array([True] * 500 + [False] * 500)
    noise = np.random.default_rng(5).random(1000)
    strong = np.where(labels, 1.0, 0.0) + noise * 0.1
    missing = np.full(1000, np.nan)  # a score the backend cannot give never flags
    result = audit_epsilon(labels, {"noise": noise, "strong": strong, "missing": missing})
    assert result["score"] == "strong" and result["epsilon_lower_bound"] > 3


def test_a_score_unrelated_to_membership_refutes_no_epsilon():
    rng = np.random.default_rng(3)
    labels = rng.random(4000) < 0.5
    result = audit_epsilon(labels, {"noise": rng.random(4000)}, seed=0)
    assert result["epsilon_lower_bound"] == 0.0


def test_no_bound_without_both_classes_in_each_half():
    assert audit_epsilon(np.array([True, False]), {"s": np.array([1.0, 0.0])}) is None
