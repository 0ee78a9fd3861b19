"""Typed summary parts from hand-picked figures, for unit tests of verdicts, policy and report:
what a test does not name is filled with figures that enter neither verdict nor policy."""

from __future__ import annotations

from ezmia.report.model import ScoreMetrics, SummaryData
from ezmia.stats.metrics import FPR_POINTS

POINT = {"threshold": 0.0, "tp": 0, "n_members": 200, "fp": 0, "n_nonmembers": 1000, "tpr": 0.0,
         "tpr_exact_ci95": [0.0, 1.0], "fpr": 0.0, "fpr_exact_ci95": [0.0, 1.0]}  # fmt: skip


def metrics(figures: dict) -> ScoreMetrics:
    """One score's metrics: ``figures`` (``operating_points`` may give just ``tpr`` and its
    interval) over 200 members and ``n_nonmembers`` (1000 unless given)."""
    n_nonmembers = figures.get("n_nonmembers", 1000)
    points = {name: {**POINT, "fpr": FPR_POINTS[name], "n_nonmembers": n_nonmembers, **at}
              for name, at in figures.get("operating_points", {}).items()}  # fmt: skip
    counts = {"n": 200 + n_nonmembers, "n_members": 200, "n_nonmembers": n_nonmembers}
    return ScoreMetrics(**{**counts, **figures, "operating_points": points})


def data(**fields) -> SummaryData:
    """A summary's data part; a leakage audit of 1200 rows with an unknown verdict unless
    ``fields`` say otherwise (metrics given as figures)."""
    if "metrics" in fields:
        fields["metrics"] = {name: m if isinstance(m, ScoreMetrics) else metrics(m)
                             for name, m in fields["metrics"].items()}  # fmt: skip
    defaults = {"mode": "leakage", "n_rows": 1200, "status_counts": {"ok": 1200},
                "verdict": {"level": "unknown", "text": "not judged"}}  # fmt: skip
    return SummaryData(**{**defaults, **fields})
