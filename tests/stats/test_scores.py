"""Hand-computed EZ scores for every status, and the baselines against their formulas."""

import math
import warnings

import numpy as np
import pytest

from ezmia.stats.scores import (
    EZ_EMPTY,
    EZ_NO_NEGATIVE_SHIFT,
    EZ_NON_FINITE,
    EZ_OK,
    EZ_TOO_FEW_ERRORS,
    EZ_TOO_SHORT,
    SCORES,
    Score,
    TokenStats,
    ez_score,
    register,
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
    assert (result.score, result.status, result.n_errors) == (0.0, EZ_NO_NEGATIVE_SHIFT, 4 - 1)


@pytest.mark.parametrize(
    ("n_tokens", "status"), [(0, EZ_EMPTY), (1, EZ_TOO_SHORT), (2, EZ_TOO_SHORT)]
)
def test_ez_of_sequences_too_short_to_have_an_error_zone(n_tokens, status):
    n = max(n_tokens - 1, 0)
    result = ez_score(stats([-1.0] * n, [-1.0] * n, [False] * n), n_tokens=n_tokens)
    assert (result.score, result.status, result.n_errors) == (0.0, status, 0)


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


@pytest.mark.parametrize(
    ("n_positions", "expected"),
    [
        (1, 0.0),  # k = 1 (at least one position)
        (4, -3.0),  # 20% of 4 = 0.8: still k = 1
        (6, -5.0),  # 1.2: k = 1 (rounding up would give 2)
        (9, -8.0),  # 1.8: k = 1 (rounding to nearest would give 2)
        (10, -8.5),  # exactly 2
        (14, -12.5),  # 2.8: k = 2
        (15, -13.0),  # exactly 3
    ],
)
def test_min_k_counts_the_floor_of_a_fifth_of_the_positions_but_at_least_one(n_positions, expected):
    lp = [-float(i) for i in range(n_positions)]  # distinct: 0, -1, ..., -(n-1)
    ones = [1.0] * n_positions
    zeros = [0.0] * n_positions
    row = score_sequence(
        stats(lp, lp, [False] * n_positions, zeros, ones), n_tokens=n_positions + 1, zlib_size=1
    )
    assert row["min_k"] == pytest.approx(expected)
    assert row["min_k_pp"] == pytest.approx(expected)  # z = lp with mu 0, sigma 1


def test_two_token_sequences_have_every_baseline_from_their_one_position():
    row = score_sequence(stats([-2.0], [-0.5], [False], [-3.0], [2.0]), n_tokens=2, zlib_size=4)
    assert (row["ez_score"], row["ez_status"], row["n_scored"]) == (0.0, EZ_TOO_SHORT, 1)
    assert row["loss"] == -2.0
    assert row["ref_ratio"] == -1.5
    assert row["zlib"] == -0.5
    assert row["min_k"] == -2.0
    assert row["min_k_pp"] == 0.5


def test_baselines_average_every_position_including_the_first():
    # EZ skips t = 1; the baselines do not.
    row = score_sequence(stats([-4.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [False] * 3), 4, 2)
    assert (row["loss"], row["ref_ratio"], row["zlib"]) == (-2.0, -1.0, -1.0)


def test_zlib_score_without_compressed_text_is_nan():
    row = score_sequence(stats(LP_T, LP_R, [False] * 4), n_tokens=5, zlib_size=0)
    assert math.isnan(row["zlib"])
    assert row["loss"] == pytest.approx(-1.75)


def test_min_k_pp_without_the_distribution_is_nan():
    row = score_sequence(stats(LP_T, LP_R, [False] * 4), n_tokens=5, zlib_size=1)
    assert math.isnan(row["min_k_pp"])
    assert row["min_k"] == -3.0


def test_ez_of_exactly_three_tokens_has_one_error_zone_position():
    result = ez_score(stats([-1.0, -2.0], [-2.0, -1.0], [False, False]), n_tokens=3)
    assert (result.score, result.status, result.n_errors) == (0.0, EZ_TOO_FEW_ERRORS, 1)


def test_ez_counts_zero_shifts_as_errors_but_in_neither_sum():
    result = ez_score(stats([0, -1.0, -1.0, -3.0], [0, -1.0, -2.0, -2.0], [False] * 4), 5)
    assert (result.score, result.status, result.n_errors) == (1.0, EZ_OK, 3)


@pytest.mark.filterwarnings("error")  # the overflow is expected: no RuntimeWarning in users' logs
def test_ez_whose_sums_overflow_is_non_finite_not_infinite_and_warns_nothing():
    # Two shifts of +1e308 sum to inf; the one negative shift is finite.
    lp_t, lp_r = [0.0, 0.0, 0.0, -1.0], [0.0, -1e308, -1e308, 0.0]
    result = ez_score(stats(lp_t, lp_r, [False] * 4), n_tokens=5)
    assert (result.score, result.status, result.n_errors) == (0.0, EZ_NON_FINITE, 3)


def test_zlib_score_divides_by_any_positive_size():
    row = score_sequence(stats(LP_T, LP_R, [False] * 4), n_tokens=5, zlib_size=1)
    assert row["zlib"] == pytest.approx(-1.75)


def test_min_k_pp_needs_both_mean_and_spread():
    row = score_sequence(stats(LP_T, LP_R, [False] * 4, mu=[0.0] * 4), n_tokens=5, zlib_size=1)
    assert math.isnan(row["min_k_pp"])


@pytest.mark.parametrize(
    ("lp_t", "lp_r", "mu", "sigma"),
    [
        ([], [], [], []),  # no positions
        ([-math.inf, math.inf, -1.0], [math.inf, math.inf, -1.0], [0.0] * 3, [1.0] * 3),
        ([-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]),  # 0/0, x/0
    ],
)
def test_scoring_degenerate_statistics_warns_nothing(lp_t, lp_r, mu, sigma):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = score_sequence(stats(lp_t, lp_r, [False] * len(lp_t), mu, sigma), len(lp_t) + 1, 8)
    assert row["ez_status"] in (EZ_TOO_SHORT, EZ_NON_FINITE, EZ_OK)


def test_empty_statistics_have_no_positions_of_every_kind():
    empty = TokenStats.empty()
    for values in (empty.lp_target, empty.lp_reference, empty.mu, empty.sigma):
        assert values.shape == (0,) and values.dtype == np.float64
    assert empty.target_top1.shape == (0,) and empty.target_top1.dtype == bool
    assert empty.n_positions == 0
    without = TokenStats.empty(with_distribution=False)
    assert (without.mu, without.sigma) == (None, None)
    assert without.lp_target.shape == without.lp_reference.shape == (0,)


@pytest.mark.parametrize("name", [name for name, score in SCORES.items() if score.fn])
def test_each_baseline_alone_warns_nothing_on_zero_spread(name):
    lp = [-1.0, -2.0, -1.0]
    degenerate = stats(lp, lp, [False] * 3, [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0])  # 0/0 and x/0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SCORES[name].fn(degenerate, 8)


def test_registering_a_score_records_its_metadata_and_first_docstring_line():
    def toy(stats: TokenStats, zlib_size: int) -> float:
        """Toy: the first position's log-prob.

        Not the description."""
        return float(stats.lp_target[0])

    try:
        assert register("toy", "Toy", "#123456", higher="a likelier first token")(toy) is toy
        assert SCORES["toy"] == Score(
            "toy", "Toy", "#123456", "a likelier first token",
            "Toy: the first position's log-prob.", toy, False,
        )  # fmt: skip
        register("toy", "Toy", "#123456", higher="x", needs_distribution=True)(toy)
        assert SCORES["toy"].needs_distribution
        assert score_sequence(stats(LP_T, LP_R, [False] * 4), 5, 1)["toy"] == -1.0
    finally:
        SCORES.pop("toy", None)


def test_a_score_without_a_docstring_registers_with_an_empty_description():
    def bare(stats: TokenStats, zlib_size: int) -> float:
        return 0.0

    try:
        register("bare", "Bare", "#000000", higher="nothing")(bare)
        assert SCORES["bare"].description == ""
    finally:
        SCORES.pop("bare", None)
