"""Canary cross-check: score a few sequences with two backends and compare the statistics.

It catches gross faults of a fast backend (a wrong or missing adapter, shifted positions, a
different tokenizer or weights), which move log-probs by far more than numerical noise.

Tolerances, on the true-token log-probs of both passes and the target's top-1 hits:

- fp32: every ``|lp_a - lp_b| <= 1e-4`` and no top-1 disagreement (vLLM fp32 matched
  transformers to ~2e-6 with no disagreement on GPT-2).
- bf16/fp16: mean ``|lp_a - lp_b| <= 0.05``, every one ``<= 1.0``, and top-1 disagreements at
  no more than 1% of positions. One bf16 rounding step of a logit near 16 is 0.06, and two
  implementations legitimately round differently at a few positions, so a tight maximum
  would fail healthy engines; the mean and the loose maximum still flag real faults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ezmia.backends.base import PassColumns, stats_from_columns
from ezmia.stats.scores import TokenStats

HALF_PRECISION = ("bfloat16", "float16", "half", "bf16", "fp16")


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed differences between two backends' statistics."""

    max_abs: float
    mean_abs: float
    top1_fraction: float


FP32_TOLERANCE = Tolerance(max_abs=1e-4, mean_abs=1e-4, top1_fraction=0.0)
HALF_TOLERANCE = Tolerance(max_abs=1.0, mean_abs=0.05, top1_fraction=0.01)


@dataclass(frozen=True)
class CanaryResult:
    """Outcome of a cross-check; ``passed`` is False also when position counts differ."""

    passed: bool
    max_abs_logprob_diff: float
    mean_abs_logprob_diff: float
    top1_disagreements: int
    n_positions: int
    tolerance: Tolerance
    dtype: str

    def as_record(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite differences become None)."""
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        return record

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"canary {verdict} ({self.dtype}): max |dlogprob| {self.max_abs_logprob_diff:.2e} "
            f"(limit {self.tolerance.max_abs:g}), mean {self.mean_abs_logprob_diff:.2e} "
            f"(limit {self.tolerance.mean_abs:g}), {self.top1_disagreements} top-1 "
            f"disagreements in {self.n_positions} positions "
            f"(limit {self.tolerance.top1_fraction:.0%})"
        )


def compare_stats(
    primary: Sequence[TokenStats], fallback: Sequence[TokenStats], dtype: str
) -> CanaryResult:
    """Compare two backends' statistics of the same sequences under ``dtype``'s tolerance."""
    tol = HALF_TOLERANCE if dtype in HALF_PRECISION else FP32_TOLERANCE
    pairs = list(zip(primary, fallback, strict=False))
    if len(primary) != len(fallback) or any(a.n_positions != b.n_positions for a, b in pairs):
        return CanaryResult(False, float("inf"), float("inf"), 0, 0, tol, dtype)
    diffs = np.concatenate(
        [np.zeros(0)]
        + [np.abs(a.lp_target - b.lp_target) for a, b in pairs]
        + [np.abs(a.lp_reference - b.lp_reference) for a, b in pairs]
    )
    flips = sum(int((a.target_top1 != b.target_top1).sum()) for a, b in pairs)
    n = sum(a.n_positions for a in primary)
    max_abs = float(diffs.max()) if diffs.size else 0.0
    mean_abs = float(diffs.mean()) if diffs.size else 0.0
    passed = (
        n > 0
        and max_abs <= tol.max_abs
        and mean_abs <= tol.mean_abs
        and flips <= tol.top1_fraction * n
    )
    return CanaryResult(bool(passed), max_abs, mean_abs, flips, n, tol, dtype)


def stage_stats(columns: PassColumns) -> list[TokenStats]:
    """``TokenStats`` of one model stage's columns, to compare two backends on exactly what the
    stage emits: a pass the stage does not run mirrors the one it does, and a reference stage
    has no top-1 hits (all False on both sides)."""
    lp_target = columns.get("lp_target") or columns["lp_reference"]
    lp_reference = columns.get("lp_reference") or lp_target
    top1 = columns.get("target_top1") or [np.zeros(len(lp), dtype=bool) for lp in lp_target]
    mirrored = {"lp_target": lp_target, "lp_reference": lp_reference, "target_top1": top1}
    return stats_from_columns(mirrored)
