"""Attack metrics with known labels (AUC, TPR at a fixed FPR, bootstrap intervals) and the
detection threshold for unlabelled candidates. Pure math, no I/O."""

from __future__ import annotations

import math

import numpy as np

FPR_POINTS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
METRICS = ("auc", *FPR_POINTS)
"""Every point metric of a score, in table order: the index's columns, the report's table,
the policy's limits (``max_<metric>``)."""


def metric_label(name: str) -> str:
    """A metric's display name: "AUC" or "TPR @ 1% FPR"."""
    return "AUC" if name == "auc" else f"TPR @ {100 * FPR_POINTS[name]:g}% FPR"


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPRs and TPRs of the ROC curve, from (0, 0): one corner per distinct score, collinear
    points dropped. Equal to scikit-learn's ``roc_curve`` (its tests compare them), written
    in numpy because the bootstrap draws a thousand curves and sklearn's input validation
    cost more than the curves."""
    order = np.argsort(-scores)  # the order within tied scores does not matter: ties are one corner
    hits = labels[order]  # booleans or 0/1
    last = np.r_[np.flatnonzero(np.diff(scores[order])), hits.size - 1]  # each score's last row
    tps = np.cumsum(hits)[last]
    fps = last + 1 - tps
    if fps.size > 2:
        corner = np.r_[True, np.diff(fps, 2).astype(bool) | np.diff(tps, 2).astype(bool), True]
        fps, tps = fps[corner], tps[corner]
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """TPR read off the ROC curve by linear interpolation at ``fpr``, as the paper's code."""
    fprs, tprs = roc(labels, scores)
    return float(np.interp(fpr, fprs, tprs))


def point_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC and TPR at each FPR of ``FPR_POINTS``, from one ROC curve."""
    fprs, tprs = roc(labels, scores)
    out = {"auc": float(np.trapezoid(tprs, fprs))}
    out.update({name: float(np.interp(fpr, fprs, tprs)) for name, fpr in FPR_POINTS.items()})
    return out


def bootstrap_intervals(
    labels: np.ndarray, scores: np.ndarray, rounds: int, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every point metric (resampling rows)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    n = labels.shape[0]
    for _ in range(rounds):
        pick = rng.integers(0, n, n)
        if labels[pick].min() == labels[pick].max():
            continue
        for name, value in point_metrics(labels[pick], scores[pick]).items():
            samples.setdefault(name, []).append(value)
    tail = (1 - level) / 2 * 100
    return {
        name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
        for name, v in samples.items()
    }


def labelled_metrics(
    labels: np.ndarray, scores: np.ndarray, bootstrap_rounds: int = 200, seed: int = 0
) -> dict[str, object]:
    """Point metrics with 95% bootstrap intervals, over rows whose score is finite. A TPR at
    an FPR the non-members cannot resolve (fewer than ``1/FPR``) is ``None``; ``unresolved``
    says how many non-members it needs and bounds it from above by the TPR at the lowest
    rate they do resolve. Each resolved FPR gets its operating point with exact intervals."""
    finite = np.isfinite(scores)
    labels, scores = labels[finite].astype(bool), scores[finite]
    n_nonmembers = int((~labels).sum())
    points = point_metrics(labels, scores)
    intervals = bootstrap_intervals(labels, scores, bootstrap_rounds, seed)
    out: dict[str, object] = {
        "n": int(labels.shape[0]),
        "n_members": int(labels.sum()),
        "n_nonmembers": n_nonmembers,
        "auc": points["auc"],
        "auc_ci95": intervals.get("auc"),
        "operating_points": {},
        "unresolved": {},
    }
    for name, fpr in FPR_POINTS.items():
        if n_nonmembers >= min_nonmembers(fpr):
            out[name], out[f"{name}_ci95"] = points[name], intervals.get(name)
            out["operating_points"][name] = operating_point(labels, scores, fpr)
            continue
        out[name] = out[f"{name}_ci95"] = None
        out["unresolved"][name] = {
            "fpr": fpr,
            "needs_nonmembers": min_nonmembers(fpr),
            "upper_bound": tpr_at_fpr(labels, scores, 1 / n_nonmembers),
            "upper_bound_at_fpr": 1 / n_nonmembers,
        }
    return out


def detection_threshold(calibration_scores: np.ndarray, fpr: float) -> float:
    """The score above which a known non-member falls with probability ``fpr``."""
    finite = calibration_scores[np.isfinite(calibration_scores)]
    return float(np.quantile(finite, 1.0 - fpr))


def min_nonmembers(fpr: float) -> int:
    """The fewest non-members at which a false-positive rate of ``fpr`` can be observed."""
    return math.ceil(1 / fpr - 1e-9)


def exact_interval(successes: int, trials: int, level: float = 0.95) -> list[float]:
    """Clopper-Pearson (exact binomial) interval of a rate; each tail holds (1-level)/2."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = (
        1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    )
    return [low, high]


def operating_point(labels: np.ndarray, scores: np.ndarray, fpr: float) -> dict[str, object]:
    """The attack that flags ``score > threshold`` with at most ``fpr`` of the non-members
    flagged: its threshold, counts, and exact 95% intervals of its TPR and FPR."""
    negatives = np.sort(scores[~labels])[::-1]
    allowed = math.floor(fpr * len(negatives) + 1e-9)  # false positives the rate permits
    threshold = float(negatives[allowed]) if allowed < len(negatives) else -math.inf
    tp = int((scores[labels] > threshold).sum())
    fp = int((negatives > threshold).sum())
    n_members, n_nonmembers = int(labels.sum()), len(negatives)
    return {
        "threshold": threshold,
        "tp": tp,
        "n_members": n_members,
        "fp": fp,
        "n_nonmembers": n_nonmembers,
        "tpr": tp / n_members,
        "tpr_exact_ci95": exact_interval(tp, n_members),
        "fpr": fp / n_nonmembers,
        "fpr_exact_ci95": exact_interval(fp, n_nonmembers),
    }
