"""The audit summary: status counts, metrics per score, detection threshold and a verdict,
computed from the score columns alone (never from texts)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ezmia.metrics import labelled_metrics
from ezmia.scores import EZ_OK, EZ_STATUSES, SCORE_COLUMNS

VERDICT_RULES = (  # (level, EZ metric, limit): the first rule whose limit is exceeded wins
    ("high", "tpr_at_0_1pct_fpr", 0.05),
    ("high", "auc", 0.75),
    ("moderate", "tpr_at_1pct_fpr", 0.05),
    ("moderate", "auc", 0.6),
)
# The fewest scored (ez_status ok) members and non-members a verdict needs. With 20 members
# one identified record is a TPR of 5%, the TPR limits above, so no single record can make a
# checkpoint "high"; with 20 of each, a checkpoint that leaks nothing shows an AUC above 0.75
# by chance in about 0.3% of audits (Mann-Whitney, normal approximation).
MIN_SCORED_MEMBERS = 20
MIN_SCORED_NONMEMBERS = 20


def exceeds(value: float, limit: float) -> bool:
    """The one boundary rule of verdict levels and policy limits: a metric breaches a limit
    only when it is above it; a value equal to the limit stays within it."""
    return value > limit


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


def scored_counts(scores: pa.Table) -> tuple[int, int]:
    """Rows with ``ez_status`` ok among members and among non-members."""
    ok = pc.equal(scores.column("ez_status"), EZ_OK)
    member = pc.fill_null(scores.column("is_member").cast(pa.bool_()), False)
    counts = [pc.sum(pc.and_(ok, m).cast(pa.int64())).as_py() for m in (member, pc.invert(member))]
    return counts[0] or 0, counts[1] or 0


def insufficient(members: int, nonmembers: int, status_counts: dict[str, int]) -> dict | None:
    """The "insufficient" verdict when too few rows were scored to support one, else None."""
    if members >= MIN_SCORED_MEMBERS and nonmembers >= MIN_SCORED_NONMEMBERS:
        return None
    unscored = ", ".join(f"{n} {s}" for s, n in status_counts.items() if s != EZ_OK and n)
    return {
        "level": "insufficient",
        "text": f"Too few scored rows for a verdict: {members} members and {nonmembers} "
        f"non-members were scored (ez_status ok); a verdict needs at least "
        f"{MIN_SCORED_MEMBERS} of each. Not scored: {unscored or 'none'}. Add rows, or raise "
        "--max-length when rows are too_few_errors or too_short.",
    }


def verdict(metrics: dict[str, dict]) -> dict[str, str]:
    """A plain-language verdict from the EZ metrics (the strongest attack in the paper)."""
    ez = metrics.get("ez_score")
    if not ez:
        return {"level": "unknown", "text": "No labelled EZ metrics: leakage cannot be judged."}
    level = next((lvl for lvl, key, limit in VERDICT_RULES if exceeds(ez[key], limit)), "low")
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
        counts = summary["status_counts"]
        summary["verdict"] = insufficient(*scored_counts(scores), counts) or verdict(
            summary["metrics"]
        )
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
