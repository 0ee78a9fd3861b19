"""The audit index: one Parquet row per audit, Hive-partitioned by date.

Reports of a multi-audit run go under ``ROOT/date=YYYY-MM-DD/checkpoint=<name>/``. Each row
is a part file named after its report's location, so a retried audit (after a kill or a
failure) replaces its own row instead of adding a second one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import pyarrow as pa

from ezmia.audit import AuditResult
from ezmia.config import AuditConfig
from ezmia.data import outputs, storage
from ezmia.data.schema import SCHEMA_VERSION, index_schema
from ezmia.stats.metrics import METRICS
from ezmia.stats.scores import EZ_OK, SCORES


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")


def safe_name(name: str) -> str:
    """A checkpoint name usable as one path segment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"


def report_location(root: str, name: str, date: str | None = None) -> str:
    return storage.join(root, f"date={date or today()}", f"checkpoint={safe_name(name)}")


def dataset_label(config: AuditConfig) -> str:
    """The index's ``dataset``: the audit's data files, or its member then non-member files."""
    return ", ".join(config.datasets)


def index_row(result: AuditResult, dataset: str) -> dict:
    """The index row of one finished audit."""
    summary, models = result.summary, result.summary.models
    blind, privacy = summary.blind_baseline, summary.privacy
    low, high = (blind and blind.auc_ci95) or [None, None]
    row: dict = {
        "audited_at": dt.datetime.now(dt.timezone.utc),
        "checkpoint": summary.name,
        "target": models.target,
        "reference": models.reference,
        "target_is_adapter": models.target_is_adapter,
        "target_fingerprint": models.fingerprints.get("target"),
        "dataset": dataset,
        "mode": summary.mode,
        "n": summary.n_rows,
        "n_ok": summary.status_counts.get(EZ_OK, 0),
        "backend": summary.backend.name,
        "verdict": summary.verdict.level,
        "verdict_score": summary.verdict.score,
        "epsilon_lower_bound": privacy and privacy.epsilon_lower_bound,
        "report_uri": storage.join(result.out, outputs.REPORT),
        "schema_version": SCHEMA_VERSION,
        "blind_auc": blind and blind.auc,
        "blind_auc_lo": low,
        "blind_auc_hi": high,
        "blind_distinguishable": blind and blind.distinguishable,
    }
    for score in SCORES:
        values = summary.metrics.get(score)
        for metric in METRICS:
            name = f"{score}_{metric}"
            low, high = (values and getattr(values, f"{metric}_ci95")) or [None, None]
            row.update({name: values and getattr(values, metric), f"{name}_lo": low,
                        f"{name}_hi": high})  # fmt: skip
    return row


def write_index(
    root: str,
    rows: list[dict],
    encryption: storage.Encryption | None = None,
    date: str | None = None,
) -> str | None:
    """Write each row as ``ROOT/index/date=.../audits-<key>.parquet``, the key a hash of its
    report's location (rewriting the row of an earlier try); returns the folder."""
    if not rows:
        return None
    folder = storage.join(root, "index", f"date={date or today()}")
    schema = index_schema()
    for row in rows:
        key = hashlib.sha256(row["report_uri"].encode()).hexdigest()[:24]
        table = pa.Table.from_pylist([row], schema=schema)
        storage.write_parquet(storage.join(folder, f"audits-{key}.parquet"), table, encryption)
    return folder
