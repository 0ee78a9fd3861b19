"""Hand-computed EZ scores for every status, and the baselines against their formulas."""

import math

import numpy as np
import pytest

from ezmia.scores import (
    EZ_EMPTY,
    EZ_NO_NEGATIVE_SHIFT,
    EZ_OK,
    EZ_TOO_FEW_ERRORS,
    EZ_TOO_SHORT,
    TokenStats,
    ez_score,
    score_sequence,
)

LP_T = [-1.0, -2.0, -1.0, -3.0]
LP_R = [-2.0, -1.0, -2.0, -2.0]


def stats(lp_t, lp_r, top1, mu=None, sigma=None):
    arr = lambda v: None if v is None else np.asarray(v, dtype=np.float64)  # noqa: E731
    return TokenStats(arr(lp_t), arr(lp_r), np.asarray(top1, dtype=bool), arr(mu), arr(sigma))


def test_ez_skips_first_position_and_divides_positive_by_negative_shift():
    # t=1 (delta +1) is skipped; error zone t=2..4 has deltas -1, +1, -1 -> 1 / 2.
    result = ez_score(stats(LP_T, LP_R, [False] * 4), n_tokens=5)
    assert (result.score, result.status, result.n_errors) == (0.5, EZ_OK, 3)


def test_ez_ignores_positions_where_target_predicts_right():
    result = ez_score(stats(LP_T, LP_R, [False, False, True, False]), n_tokens=5)
    assert (result.score, result.status, result.n_errors) == (0.0, EZ_OK, 2)


def test_ez_with_fewer_than_two_errors_is_zero_with_status():
    result = ez_score(stats(LP_T, LP_R, [False, True, True, False]), n_tokens=5)
    assert (result.score, result.status, result.n_errors) == (0.0, EZ_TOO_FEW_ERRORS, 1)


def test_ez_without_negative_shift_is_zero_with_explicit_status():
    result = ez_score(stats([-1.0] * 4, [-2.0] * 4, [False] * 4), n_tokens=5)
    assert (result.score, result.status) == (0.0, EZ_NO_NEGATIVE_SHIFT)


@pytest.mark.parametrize(
    ("n_tokens", "status"), [(0, EZ_EMPTY), (1, EZ_TOO_SHORT), (2, EZ_TOO_SHORT)]
)
def test_ez_of_sequences_too_short_to_have_an_error_zone(n_tokens, status):
    n = max(n_tokens - 1, 0)
    result = ez_score(stats([-1.0] * n, [-1.0] * n, [False] * n), n_tokens=n_tokens)
    assert (result.score, result.status) == (0.0, status)


def test_baselines_follow_their_formulas_oriented_higher_is_member():
    mu, sigma = [-2.0, -2.0, -2.0, -2.0], [1.0, 2.0, 1.0, 0.5]
    row = score_sequence(stats(LP_T, LP_R, [False] * 4, mu, sigma), n_tokens=5, zlib_size=10)
    assert row["loss"] == pytest.approx(-1.75)
    assert row["ref_ratio"] == pytest.approx(np.mean(LP_T) - np.mean(LP_R))
    assert row["zlib"] == pytest.approx(-1.75 / 10)
    assert row["min_k"] == pytest.approx(-3.0)  # lowest 20% of 4 positions = 1 position
    assert row["min_k_pp"] == pytest.approx(-2.0)  # z = [1, 0, 1, -2]
    assert row["n_scored"] == 4


def test_min_k_averages_the_lowest_fifth():
    lp = [-float(i) for i in range(10)]
    row = score_sequence(stats(lp, lp, [False] * 10), n_tokens=11, zlib_size=5)
    assert row["min_k"] == pytest.approx(-8.5)


def test_scores_of_sequences_without_positions_are_nan():
    row = score_sequence(TokenStats.empty(), n_tokens=1, zlib_size=1)
    assert row["ez_status"] == EZ_TOO_SHORT
    assert all(math.isnan(row[k]) for k in ("loss", "ref_ratio", "zlib", "min_k", "min_k_pp"))
