"""The audit summary: status counts, metrics per score, detection threshold and a verdict,
computed from the score columns alone (never from texts)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ezmia.metrics import labelled_metrics
from ezmia.scores import EZ_STATUSES, SCORE_COLUMNS

VERDICT_RULES = (
    ("high", "tpr_at_0_1pct_fpr", 0.05),
    ("high", "auc", 0.75),
    ("moderate", "tpr_at_1pct_fpr", 0.05),
    ("moderate", "auc", 0.6),
)


def status_counts(scores: pa.Table) -> dict[str, int]:
    counts = {s: 0 for s in EZ_STATUSES}
    for entry in pc.value_counts(scores.column("ez_status")).to_pylist():
        counts[entry["values"]] = entry["counts"]
    return counts


def _column(scores: pa.Table, name: str) -> np.ndarray:
    return scores.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def leakage_metrics(
    scores: pa.Table, bootstrap_rounds: int, seed: int
) -> tuple[dict[str, dict], dict[str, str]]:
    """Metrics of every score column against ``is_member``; and why any score was skipped."""
    labels = scores.column("is_member").to_numpy(zero_copy_only=False).astype(bool)
    metrics: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in SCORE_COLUMNS:
        values = _column(scores, name)
        finite = np.isfinite(values)
        if not finite.any():
            skipped[name] = "no finite values (the backend does not provide this statistic)"
            continue
        kinds = set(labels[finite].tolist())
        if len(kinds) < 2:
            skipped[name] = "needs both members and non-members among scored rows"
            continue
        metrics[name] = labelled_metrics(labels, values, bootstrap_rounds, seed)
    return metrics, skipped


def verdict(metrics: dict[str, dict]) -> dict[str, str]:
    """A plain-language verdict from the EZ metrics (the strongest attack in the paper)."""
    ez = metrics.get("ez_score")
    if not ez:
        return {"level": "unknown", "text": "No labelled EZ metrics: leakage cannot be judged."}
    level = next((lvl for lvl, key, limit in VERDICT_RULES if ez[key] >= limit), "low")
    found = (
        f"At 0.1% false positives an attacker identifies {ez['tpr_at_0_1pct_fpr']:.1%} of the "
        f"training records (AUC {ez['auc']:.3f})."
    )
    advice = {
        "high": "The checkpoint leaks its training data: do not release it as is.",
        "moderate": "The checkpoint leaks measurably: review before release.",
        "low": "Little measurable leakage with this attack and data.",
    }[level]
    return {"level": level, "text": f"{advice} {found}"}


def build_summary(
    scores: pa.Table, *, mode: str, bootstrap_rounds: int, seed: int, detection: dict | None
) -> dict:
    """The summary's data part; ``detection`` holds the threshold in detection mode."""
    summary: dict = {
        "mode": mode,
        "n_rows": scores.num_rows,
        "status_counts": status_counts(scores),
    }
    if mode == "leakage":
        summary["metrics"], summary["metrics_skipped"] = leakage_metrics(
            scores, bootstrap_rounds, seed
        )
        summary["verdict"] = verdict(summary["metrics"])
    elif mode == "detection" and detection is not None:
        n_flagged = int(pc.sum(scores.column("flagged")).as_py() or 0)
        summary["detection"] = {
            **detection,
            "n_flagged": n_flagged,
            "n_candidates": scores.num_rows,
        }
        summary["verdict"] = {
            "level": "unknown",
            "text": f"{n_flagged} of {scores.num_rows} candidates score above the EZ threshold "
            f"that {detection['fpr']:.2%} of known non-members exceed.",
        }
    else:
        summary["verdict"] = {"level": "unknown", "text": "Scores only: no labels to judge by."}
    return summary
