"""The versioned schemas of every table ezmia writes (scores, index, ledger, alerts).

Analysts query these with DuckDB, Athena or Spark; bump ``SCHEMA_VERSION`` on any change.
"""

from __future__ import annotations

import pyarrow as pa

from ezmia.stats.metrics import METRICS
from ezmia.stats.scores import SCORES

# 2: index gains verdict_score, blind_auc*, epsilon_lower_bound; TPRs null when unresolved
SCHEMA_VERSION = 2


def scores_schema(
    id_type: pa.DataType, labelled: bool, flagged: bool, with_text: bool
) -> pa.Schema:
    """The schema of ``scores/*.parquet`` for one audit's options: ``id``, EZ with its status
    and counts, every other registered score, the row's provenance, then
    ``is_member``/``flagged``/``text`` when present. Every score column: higher = more
    member-like."""
    others = [pa.field(column, pa.float64()) for column in SCORES if column != "ez_score"]
    fields = [
        pa.field("id", id_type),
        pa.field("ez_score", pa.float64()),
        pa.field("ez_status", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_scored", pa.int32()),
        pa.field("n_errors", pa.int32()),
        pa.field("truncated", pa.bool_()),
        *others,
        pa.field("text_sha256", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("backend", pa.string()),
    ]
    if labelled:
        fields.append(pa.field("is_member", pa.bool_()))
    if flagged:
        fields.append(pa.field("flagged", pa.bool_()))
    if with_text:
        fields.append(pa.field("text", pa.string()))
    return pa.schema(fields, metadata={"ezmia_schema_version": str(SCHEMA_VERSION)})


def index_schema() -> pa.Schema:
    """``OUT/index/date=YYYY-MM-DD/*.parquet``: one row per audit (org-wide job and nightly
    scan), with every registered score's metrics (``<score>_<metric>``) and their 95%
    intervals (``_lo``/``_hi`` beside each)."""
    metrics = [
        pa.field(f"{score}_{metric}{end}", pa.float64())
        for score in SCORES
        for metric in METRICS
        for end in ("", "_lo", "_hi")
    ]
    return pa.schema(
        [
            pa.field("audited_at", pa.timestamp("us", tz="UTC")),
            pa.field("checkpoint", pa.string()),
            pa.field("target", pa.string()),
            pa.field("reference", pa.string()),
            pa.field("target_is_adapter", pa.bool_()),
            pa.field("target_fingerprint", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("mode", pa.string()),
            pa.field("n", pa.int64()),
            pa.field("n_ok", pa.int64()),
            pa.field("backend", pa.string()),
            *metrics,
            pa.field("verdict", pa.string()),
            pa.field("verdict_score", pa.string()),
            pa.field("blind_auc", pa.float64()),
            pa.field("blind_auc_lo", pa.float64()),
            pa.field("blind_auc_hi", pa.float64()),
            pa.field("blind_distinguishable", pa.bool_()),
            pa.field("epsilon_lower_bound", pa.float64()),
            pa.field("report_uri", pa.string()),
            pa.field("schema_version", pa.int32()),
        ],
        metadata={"ezmia_schema_version": str(SCHEMA_VERSION)},
    )


LEDGER_STATUSES = ("audited", "skipped", "failed", "unchanged")

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string()),
        pa.field("scanned_at", pa.timestamp("us", tz="UTC")),
        pa.field("checkpoint", pa.string()),
        pa.field("checkpoint_uri", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("report_uri", pa.string()),
        pa.field("verdict", pa.string()),
        pa.field("leakage", pa.string()),
        *(pa.field(f"ez_{metric}", pa.float64()) for metric in METRICS),  # EZ's point metrics
        pa.field("duration_s", pa.float64()),
        pa.field("schema_version", pa.int32()),
    ],
    metadata={"ezmia_schema_version": str(SCHEMA_VERSION)},
)
"""``OUT/ledger/date=YYYY-MM-DD/scan-<scan_id>-<n>.parquet``: one row per checkpoint per
nightly scan. ``status`` is one of ``LEDGER_STATUSES``; ``kind`` is ``full`` or ``lora``;
``verdict`` (``pass``/``fail``) is the policy's, ``leakage`` the audit's level."""

# ``OUT/alerts/date=YYYY-MM-DD/alerts-<scan_id>.json``: JSON Lines, one object per failing
# checkpoint of one scan, with LEDGER_SCHEMA's columns (``scanned_at`` as ISO 8601 text).
