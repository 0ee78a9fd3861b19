"""Property tests of the EZ score: invariances of the paper's formula and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ezmia.stats.scores import (
    EZ_NO_NEGATIVE_SHIFT,
    EZ_NON_FINITE,
    EZ_OK,
    EZ_STATUSES,
    TokenStats,
    ez_score,
    score_sequence,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""About 2 s per property on a loaded 2-core machine; the module stays under ~20 s."""

logprob = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
shift = st.floats(min_value=1e-3, max_value=20.0)


@st.composite
def sequences(draw) -> tuple[list[float], list[float], list[bool]]:
    """Per-position (lp_target, lp_reference, target_top1) for t = 1..n-1 with at least two
    error-zone positions at t >= 2 and at least one negative shift (status ``ok``)."""
    n = draw(st.integers(min_value=3, max_value=40))
    lp_t = draw(st.lists(logprob, min_size=n, max_size=n))
    lp_r = draw(st.lists(logprob, min_size=n, max_size=n))
    top1 = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    top1[1] = top1[2] = False
    errors = [i for i in range(1, n) if not top1[i]]
    down = draw(st.sampled_from(errors))
    lp_r[down] = lp_t[down] + draw(shift)  # one downward shift, so N > 0
    return lp_t, lp_r, top1


def make(lp_t, lp_r, top1) -> TokenStats:
    return TokenStats(
        np.asarray(lp_t, dtype=np.float64),
        np.asarray(lp_r, dtype=np.float64),
        np.asarray(top1, dtype=bool),
    )


def ez(lp_t, lp_r, top1):
    return ez_score(make(lp_t, lp_r, top1), n_tokens=len(lp_t) + 1)


@FAST
@given(sequences(), st.randoms(use_true_random=False))
def test_permuting_error_zone_positions_leaves_ez_unchanged(seq, rnd):
    lp_t, lp_r, top1 = seq
    before = ez(lp_t, lp_r, top1)
    errors = [i for i in range(1, len(top1)) if not top1[i]]
    shuffled = errors[:]
    rnd.shuffle(shuffled)
    new_t, new_r = lp_t[:], lp_r[:]
    for src, dst in zip(errors, shuffled, strict=True):
        new_t[dst], new_r[dst] = lp_t[src], lp_r[src]
    after = ez(new_t, new_r, top1)
    assert after.status == before.status == EZ_OK
    assert after.score == pytest.approx(before.score, rel=1e-9, abs=1e-12)


@FAST
@given(sequences(), st.lists(st.tuples(logprob, logprob), min_size=1, max_size=20))
def test_adding_top1_hits_leaves_ez_unchanged(seq, hits):
    lp_t, lp_r, top1 = seq
    before = ez(lp_t, lp_r, top1)
    after = ez(lp_t + [h[0] for h in hits], lp_r + [h[1] for h in hits], top1 + [True] * len(hits))
    assert (after.score, after.status, after.n_errors) == (
        before.score,
        before.status,
        before.n_errors,
    )


@FAST
@given(sequences(), logprob, logprob)
def test_position_one_is_ignored(seq, new_t, new_r):
    lp_t, lp_r, top1 = seq
    before = ez(lp_t, lp_r, top1)
    after = ez([new_t, *lp_t[1:]], [new_r, *lp_r[1:]], [not top1[0], *top1[1:]])
    assert (after.score, after.status) == (before.score, before.status)


@FAST
@given(sequences(), st.floats(min_value=1e-3, max_value=1e3))
def test_scaling_every_shift_by_a_positive_constant_leaves_ez_unchanged(seq, c):
    lp_t, lp_r, top1 = seq
    before = ez(lp_t, lp_r, top1)
    # lp_ref unchanged, lp_tgt moved so that every delta is multiplied by c
    scaled_t = [r + c * (t - r) for t, r in zip(lp_t, lp_r, strict=True)]
    after = ez(scaled_t, lp_r, top1)
    assert after.status == before.status
    assert after.score == pytest.approx(before.score, rel=1e-6, abs=1e-9)


@FAST
@given(st.lists(st.tuples(logprob, shift), min_size=3, max_size=30))
def test_all_upward_shifts_are_flagged_not_scored(rows):
    lp_r = [r for r, _ in rows]
    lp_t = [r + d for r, d in rows]
    result = ez(lp_t, lp_r, [False] * len(rows))
    assert (result.score, result.status) == (0.0, EZ_NO_NEGATIVE_SHIFT)


@FAST
@given(st.lists(st.tuples(logprob, shift), min_size=3, max_size=30))
def test_all_downward_shifts_score_zero_ok(rows):
    lp_r = [r for r, _ in rows]
    lp_t = [r - d for r, d in rows]
    result = ez(lp_t, lp_r, [False] * len(rows))
    assert (result.score, result.status) == (0.0, EZ_OK)


odd = st.one_of(logprob, st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.floats())


@FAST
@given(
    st.integers(min_value=0, max_value=25).flatmap(
        lambda n: st.tuples(
            st.lists(odd, min_size=n, max_size=n),
            st.lists(odd, min_size=n, max_size=n),
            st.lists(st.booleans(), min_size=n, max_size=n),
        )
    )
)
def test_non_finite_log_probs_never_crash_and_give_a_defined_status(seq):
    lp_t, lp_r, top1 = seq
    row = score_sequence(make(lp_t, lp_r, top1), n_tokens=len(lp_t) + 1, zlib_size=10)
    assert row["ez_status"] in EZ_STATUSES
    assert math.isfinite(row["ez_score"])
    if row["ez_status"] != EZ_OK:
        assert row["ez_score"] == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["target", "reference"])
def test_a_non_finite_error_zone_shift_gets_its_own_status(bad, which):
    lp_t, lp_r = [-1.0, -2.0, -1.0, -3.0], [-2.0, -1.0, -2.0, -2.0]
    (lp_t if which == "target" else lp_r)[2] = bad
    result = ez(lp_t, lp_r, [False] * 4)
    assert (result.score, result.status, result.n_errors) == (0.0, EZ_NON_FINITE, 3)


def test_non_finite_values_outside_the_error_zone_do_not_matter():
    lp_t, lp_r = [math.nan, -2.0, math.inf, -1.0, -3.0], [-2.0, -1.0, -math.inf, -2.0, -2.0]
    result = ez(lp_t, lp_r, [False, False, True, False, False])
    assert (result.score, result.status) == (0.5, EZ_OK)
