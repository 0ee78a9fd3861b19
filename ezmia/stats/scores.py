"""Membership scores from per-position statistics: the EZ-MIA score and the paper's baselines.

Pure math, no I/O. Every score is oriented so that higher means "more member-like". Each is
registered once in ``SCORES`` with its metadata; adding a score is one function with a
``@register(...)`` line, and the scores table, index, summary and report follow.
Position ``t`` of a sequence ``x[0..n-1]`` is stored at index ``t - 1`` of each array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MIN_K_FRACTION = 0.2

EZ_OK = "ok"
EZ_TOO_FEW_ERRORS = "too_few_errors"
EZ_NO_NEGATIVE_SHIFT = "no_negative_shift"
EZ_EMPTY = "empty"
EZ_TOO_SHORT = "too_short"
EZ_NON_FINITE = "non_finite"
EZ_STATUSES = (
    EZ_OK,
    EZ_TOO_FEW_ERRORS,
    EZ_NO_NEGATIVE_SHIFT,
    EZ_EMPTY,
    EZ_TOO_SHORT,
    EZ_NON_FINITE,
)


@dataclass(frozen=True)
class TokenStats:
    """Per-position statistics of one sequence, for positions ``t = 1..n-1``.

    ``mu``/``sigma`` are the mean and standard deviation of ``log p(v)`` under the target's
    next-token distribution; ``None`` when the backend cannot see the full distribution.
    """

    lp_target: np.ndarray
    lp_reference: np.ndarray
    target_top1: np.ndarray
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def n_positions(self) -> int:
        return int(self.lp_target.shape[0])

    @classmethod
    def empty(cls, with_distribution: bool = True) -> TokenStats:
        """Statistics of a sequence with fewer than two tokens (no predicted position)."""
        zeros = np.zeros(0, dtype=np.float64)
        dist = zeros if with_distribution else None
        return cls(zeros, zeros, np.zeros(0, dtype=bool), dist, dist)


@dataclass(frozen=True)
class EzResult:
    score: float
    status: str
    n_errors: int


ScoreFn = Callable[[TokenStats, int], float]
"""A score from a sequence's statistics and the zlib-compressed size of its text."""


@dataclass(frozen=True)
class Score:
    """One registered score and how every table, index column and chart shows it.

    ``higher`` says what a higher value means (every score is oriented so that higher is more
    member-like); ``description`` is the first line of the score function's docstring;
    ``needs_distribution``: the score reads ``mu``/``sigma``, so backends that cannot see the
    full next-token distribution leave it NaN. ``fn`` is ``None`` for EZ only, which
    ``ez_score`` computes together with its status.
    """

    column: str
    label: str
    color: str
    higher: str
    description: str
    fn: ScoreFn | None = None
    needs_distribution: bool = False


SCORES: dict[str, Score] = {}
"""Every score by column, in display order. The scores table, the index columns, the summary's
metrics and the report's tables and curves are all generated from it."""

SCORE_COLUMNS = SCORES.keys()
"""The score columns: a live view of ``SCORES``, so a registered score is in it at once."""


def _first_line(fn: Callable) -> str:
    return next(iter((fn.__doc__ or "").strip().splitlines()), "")


def register(
    column: str, label: str, color: str, *, higher: str, needs_distribution: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: register a score function as the column ``column``, shown as ``label``
    in ``color``."""

    def add(fn: ScoreFn) -> ScoreFn:
        description = _first_line(fn)
        SCORES[column] = Score(column, label, color, higher, description, fn, needs_distribution)
        return fn

    return add


def ez_score(stats: TokenStats, n_tokens: int) -> EzResult:
    """The Error Zone score: positive over negative log-prob shift where the target errs.

    Skips position ``t = 1``, as the reference code does. Edge cases score 0.0 (as in the
    reference code) and carry an explicit status so nobody mistakes them for "safe"; a NaN
    or infinite log-prob shift in the error zone (e.g. fp16 overflow) gives ``non_finite``.
    """
    if n_tokens == 0:
        return EzResult(0.0, EZ_EMPTY, 0)
    if n_tokens < 3:
        return EzResult(0.0, EZ_TOO_SHORT, 0)
    errors = ~stats.target_top1[1:]
    with np.errstate(invalid="ignore"):
        delta = (stats.lp_target[1:] - stats.lp_reference[1:])[errors]
    n_errors = int(errors.sum())
    if n_errors < 2:
        return EzResult(0.0, EZ_TOO_FEW_ERRORS, n_errors)
    if not np.isfinite(delta).all():
        return EzResult(0.0, EZ_NON_FINITE, n_errors)
    with np.errstate(over="ignore"):  # an overflowing sum is caught below as non_finite
        positive = float(delta[delta > 0].sum())
        negative = float(-delta[delta < 0].sum())
    if not negative > 0:
        return EzResult(0.0, EZ_NO_NEGATIVE_SHIFT, n_errors)
    score = positive / negative
    if not np.isfinite(score):  # sums overflowed
        return EzResult(0.0, EZ_NON_FINITE, n_errors)
    return EzResult(score, EZ_OK, n_errors)


SCORES["ez_score"] = Score("ez_score", "EZ-MIA", "#d62728", description=_first_line(ez_score),
                           higher="the target gains more than it loses where it errs")  # fmt: skip


def _lowest_k_mean(values: np.ndarray, fraction: float = MIN_K_FRACTION) -> float:
    k = max(1, int(values.shape[0] * fraction))
    return float(np.sort(values)[:k].mean())


@register("loss", "LOSS", "#1f77b4", higher="lower target loss")
def loss_score(stats: TokenStats, zlib_size: int) -> float:
    """LOSS: negated mean target loss."""
    return float(stats.lp_target.mean())


@register(
    "ref_ratio", "Reference ratio", "#2ca02c", higher="the target fits better than the reference"
)
def ref_ratio_score(stats: TokenStats, zlib_size: int) -> float:
    """Reference ratio: reference loss minus target loss."""
    return float(stats.lp_target.mean() - stats.lp_reference.mean())


@register("zlib", "zlib", "#9467bd", higher="lower target loss for the text's compressibility")
def zlib_score(stats: TokenStats, zlib_size: int) -> float:
    """zlib: negated target loss over the zlib-compressed size of the scored text."""
    return float(stats.lp_target.mean() / zlib_size) if zlib_size > 0 else float("nan")


@register("min_k", "Min-K%", "#ff7f0e", higher="even the least likely tokens are likely")
def min_k_score(stats: TokenStats, zlib_size: int) -> float:
    """Min-K%: mean of the lowest k% target log-probs."""
    return _lowest_k_mean(stats.lp_target)


@register(
    "min_k_pp",
    "Min-K%++",
    "#8c564b",
    needs_distribution=True,
    higher="even the least likely tokens stand out in the target's distribution",
)
def min_k_pp_score(stats: TokenStats, zlib_size: int) -> float:
    """Min-K%++: mean of the lowest k% of standardized target log-probs."""
    if stats.mu is None or stats.sigma is None:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (stats.lp_target - stats.mu) / stats.sigma
    return _lowest_k_mean(z)


def score_sequence(stats: TokenStats, n_tokens: int, zlib_size: int) -> dict[str, object]:
    """Every score of one sequence, plus the EZ status and counts; NaN where undefined."""
    ez = ez_score(stats, n_tokens)
    row: dict[str, object] = {
        "ez_score": ez.score,
        "ez_status": ez.status,
        "n_scored": stats.n_positions,
        "n_errors": ez.n_errors,
    }
    with np.errstate(all="ignore"):  # non-finite log-probs give NaN/inf baselines, no warning
        for score in SCORES.values():
            if score.fn is not None:
                row[score.column] = score.fn(stats, zlib_size) if stats.n_positions > 0 else np.nan
    return row
