"""An empirical lower bound on differential privacy's epsilon from membership scores.

If training is (epsilon, delta)-DP and membership is decided at random, any attack that
flags members has ``TPR <= e^eps * FPR + delta`` and ``1 - FPR <= e^eps * (1 - TPR) + delta``
(Kairouz et al.; used by DP auditing, e.g. Jagielski et al. 2020, Steinke, Nasr and Jagielski
2023). An attack's measured TPR and FPR, taken at their confident ends (exact intervals),
therefore refute every epsilon below the bound computed here. The threshold is chosen on one
random half of the rows and the bound measured on the other, so choosing it costs no
confidence. Pure math, no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

from ezmia.stats.metrics import exact_interval

DELTA = 1e-5
CONFIDENCE = 0.95


def epsilon_from_rates(tpr_low: float, fpr_high: float, delta: float) -> float:
    """The largest epsilon that a TPR of at least ``tpr_low`` at an FPR of at most
    ``fpr_high`` refutes (0 when it refutes none)."""
    bounds = [0.0]
    if tpr_low - delta > 0 and fpr_high > 0:
        bounds.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - fpr_high - delta > 0 and tpr_low < 1:
        bounds.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    return max(bounds)


@functools.lru_cache(maxsize=8192)  # thresholds of one half share few distinct counts
def epsilon_lower_bound(
    tp: int, n_members: int, fp: int, n_nonmembers: int, delta: float, confidence: float
) -> float:
    """The epsilon refuted with ``confidence`` by ``tp`` of ``n_members`` members and ``fp``
    of ``n_nonmembers`` non-members flagged: the TPR's lower and the FPR's upper exact
    bound, each with half the allowed error."""
    tpr_low = exact_interval(tp, n_members, confidence)[0]
    fpr_high = exact_interval(fp, n_nonmembers, confidence)[1]
    return epsilon_from_rates(tpr_low, fpr_high, delta)


def _bound_at(
    threshold: float, labels: np.ndarray, scores: np.ndarray, delta: float, confidence: float
) -> dict[str, object]:
    """The bound of the attack ``score > threshold`` measured on these rows."""
    flagged = scores > threshold
    counts = {
        "tp": int((flagged & labels).sum()),
        "n_members": int(labels.sum()),
        "fp": int((flagged & ~labels).sum()),
        "n_nonmembers": int((~labels).sum()),
    }
    return {
        "epsilon_lower_bound": epsilon_lower_bound(**counts, delta=delta, confidence=confidence),
        "delta": delta,
        "confidence": confidence,
        "threshold": float(threshold),
        **counts,
    }


def audit_epsilon(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    delta: float = DELTA,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    max_thresholds: int = 512,
) -> dict[str, object] | None:
    """The empirical epsilon lower bound of the attack ``score > threshold``: the score (of
    ``scores``, NaN never flagged) and the threshold (among at most ``max_thresholds`` of its
    quantiles) are both chosen on a random half of the rows and the bound is measured on the
    other; ``None`` when a half lacks members or non-members."""
    labels = labels.astype(bool)
    order = np.random.default_rng(seed).permutation(len(labels))
    choose, measure = order[: len(order) // 2], order[len(order) // 2 :]
    if any(labels[h].all() or not labels[h].any() for h in (choose, measure)):
        return None
    filled = {name: np.nan_to_num(v, nan=-np.inf) for name, v in scores.items()}
    quantiles = np.linspace(0, 1, max_thresholds)
    candidates = [
        (name, float(t))
        for name, values in filled.items()
        if np.isfinite(values[choose]).any()
        for t in np.unique(np.quantile(values[choose][np.isfinite(values[choose])], quantiles))
    ]
    if not candidates:
        return None

    def chosen_bound(candidate: tuple[str, float]) -> float:
        name, threshold = candidate
        bound = _bound_at(threshold, labels[choose], filled[name][choose], delta, confidence)
        return bound["epsilon_lower_bound"]

    name, threshold = max(candidates, key=chosen_bound)
    bound = _bound_at(threshold, labels[measure], filled[name][measure], delta, confidence)
    return {"score": name, **bound}
