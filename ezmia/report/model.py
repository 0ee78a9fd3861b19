"""The audit summary, typed: what ``summary.json`` holds, in its layout.

``Summary`` is the run's metadata (``RunMetadata``) and its data part (``SummaryData``, from
``summary.build_summary``). The TPR fields of ``ScoreMetrics`` come from ``FPR_POINTS``. A key
that was never set is not written (``dump``), so each mode keeps its own keys; keys this
version does not know are kept, so re-rendering a summary loses nothing it did not write.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from ezmia.stats.metrics import FPR_POINTS

Interval = list[float]


class Record(BaseModel):
    """A part of the summary: unknown keys kept, assignments validated."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def dump(self) -> dict[str, Any]:
        """The JSON layout: the keys that were set, declared ones first."""
        return self.model_dump(exclude_unset=True)

    def to_json(self) -> bytes:
        """As ``summary.json`` writes it."""
        return json.dumps(self.dump(), indent=2).encode()


class Verdict(Record):
    level: str
    text: str
    score: str | None = None  # a leakage verdict: the strongest score
    fpr: float | None = None  # the FPR it is judged at (None: by its AUC)
    warnings: list[str] = []
    privacy: str | None = None


class OperatingPoint(Record):
    """The attack ``score > threshold`` at one FPR point, with exact intervals."""

    threshold: float
    tp: int
    n_members: int
    fp: int
    n_nonmembers: int
    tpr: float
    tpr_exact_ci95: Interval
    fpr: float
    fpr_exact_ci95: Interval


class Unresolved(Record):
    """A TPR at a rate the non-members cannot resolve, and its upper bound."""

    fpr: float
    needs_nonmembers: int
    upper_bound: float
    upper_bound_at_fpr: float


class MetricsBase(Record):
    n: int
    n_members: int
    n_nonmembers: int
    auc: float
    auc_ci95: Interval | None = None
    operating_points: dict[str, OperatingPoint] = {}
    unresolved: dict[str, Unresolved] = {}

    @model_validator(mode="before")
    @classmethod
    def _count_nonmembers(cls, data: Any) -> Any:
        """Older summaries record ``n`` and ``n_members`` only: the rest are non-members."""
        if isinstance(data, dict) and "n_nonmembers" not in data and "n" in data:
            return {**data, "n_nonmembers": data["n"] - data.get("n_members", 0)}
        return data

    def bounded(self, metric: str) -> float | None:
        """The metric; for a TPR at a rate the non-members cannot resolve, the TPR at the
        lowest rate they do (an upper bound: ROC curves never fall)."""
        unresolved = self.unresolved.get(metric)
        return unresolved.upper_bound if unresolved else getattr(self, metric)


ScoreMetrics = create_model(
    "ScoreMetrics",
    __base__=MetricsBase,
    __doc__="One score's metrics; a TPR and its interval are None where not resolved.",
    **{
        field: (kind, None)
        for name in FPR_POINTS
        for field, kind in ((name, float | None), (f"{name}_ci95", Interval | None))
    },
)


class Detection(Record):
    fpr: float
    threshold: float
    n_calibration: int
    n_flagged: int
    n_candidates: int


class BlindBaseline(Record):
    auc: float
    auc_ci95: Interval | None
    n: int
    limit: float
    distinguishable: bool


class PrivacyBound(Record):
    score: str
    epsilon_lower_bound: float
    delta: float
    confidence: float
    threshold: float
    tp: int
    n_members: int
    fp: int
    n_nonmembers: int
    claimed_epsilon: float | None = None
    claim: str | None = None  # "refuted" or "not refuted", given a claimed epsilon


class SummaryData(Record):
    """What the score columns say: counts, metrics, detection and the verdict."""

    mode: str
    n_rows: int
    status_counts: dict[str, int]
    metrics: dict[str, ScoreMetrics] = {}  # type: ignore[valid-type]
    metrics_skipped: dict[str, str] = {}
    detection: Detection | None = None
    verdict: Verdict
    blind_baseline: BlindBaseline | None = None
    privacy: PrivacyBound | None = None


class Models(Record):
    target: str
    reference: str
    target_is_adapter: bool
    fingerprints: dict[str, str] = {}


class BackendChoice(Record):
    name: str
    reason: str


class RunMetadata(Record):
    name: str
    config: dict[str, Any]
    models: Models
    backend: BackendChoice
    versions: dict[str, str] = {}
    host: dict[str, Any] = {}


class Summary(SummaryData, RunMetadata):
    """The whole ``summary.json``: metadata, data part, then timings."""

    timings: dict[str, float] = {}
