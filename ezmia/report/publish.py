"""Re-rendering an audit's summary and report from its scores (``ezmia report OUT``).

Everything is read and checked before anything is written: an output without ``_SUCCESS``,
a missing or broken ``summary.json`` (not JSON, no valid ``config``, metadata that is not a
``Summary``'s), or scores that are missing, unreadable, lack a column the summary needs or
disagree with the summary's row count are refused with one line naming the file, and ``OUT``
is left as it was.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from ezmia.config import AuditConfig, parse_model
from ezmia.data import outputs, storage
from ezmia.errors import EzmiaError, OutputError, one_line
from ezmia.report.html import render_report
from ezmia.report.model import Summary, SummaryData
from ezmia.report.summary import build_summary
from ezmia.stats.scores import SCORE_COLUMNS

DETECTION = {"fpr", "threshold"}
RERUN = "rerun the audit (ezmia audit ... --overwrite) to write it again"


def summarize(
    config: AuditConfig, scores: pa.Table, detection: dict | None, blind: dict | None
) -> SummaryData:
    """The summary's data part of an audit with this configuration, from its score columns
    (``blind``: the blind baseline, which only the texts can give)."""
    return build_summary(
        scores,
        mode=config.mode,
        bootstrap_rounds=config.bootstrap_rounds,
        seed=config.seed,
        detection=detection,
        blind=blind,
        delta=config.delta,
        claimed_epsilon=config.claimed_epsilon,
    )


def publish(write: Callable[[str, bytes], object], summary: Summary, scores: pa.Table) -> None:
    """Write ``summary.json`` and ``report.html`` through ``write(name, data)``."""
    write(outputs.SUMMARY, summary.to_json())
    write(outputs.REPORT, render_report(summary, scores).encode())


def rerender(out: str) -> str:
    """Recompute the summary's metrics from ``scores/`` and rewrite summary and report."""
    if not outputs.is_complete(out):
        if not storage.list_files(out):
            raise OutputError(f"{out}: nothing there; give the --out of a finished audit")
        raise OutputError(f"{out}: no _SUCCESS, so this audit did not finish; rerun the audit")
    summary_uri = storage.join(out, outputs.SUMMARY)
    summary = _read_summary(summary_uri)
    config = _summary_config(summary, summary_uri)
    detection = summary.get("detection") if config.mode == "detection" else None
    scores = _read_scores(out, _needed_columns(config, detection))
    recorded = summary.get("n_rows")
    if isinstance(recorded, int) and recorded != scores.num_rows:
        raise OutputError(
            f"{storage.join(out, outputs.SCORES_DIR)}: {scores.num_rows} rows, but {summary_uri} "
            f"records {recorded}: the scores are incomplete or mixed with another run's; {RERUN}"
        )
    blind = summary.get("blind_baseline")  # from the texts, which scores never hold
    try:  # what the scores do not give (metadata, unknown keys) is kept as it was
        data = summarize(config, scores, detection, blind).dump()
        typed = Summary.model_validate({**summary, **data})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise OutputError(
            f"{summary_uri}: not a valid summary ({where}: {first['msg']}); {RERUN}"
        ) from err
    foreign = outputs.foreign_files(out)
    if foreign:
        raise OutputError(
            f"{storage.join(out, foreign[0])}: not a file this audit wrote (its "
            f"{outputs.MANIFEST} does not list it; {len(foreign)} such), and ezmia report "
            "rewrites only an audit's own files: move it elsewhere, or rerun the audit into a "
            "new --out"
        )
    encryption = config.encryption
    with outputs.locked(out, "ezmia report", encryption):
        publish(
            lambda name, data: storage.write_bytes(storage.join(out, name), data, encryption),
            typed,
            scores,
        )
    return storage.join(out, outputs.REPORT)


def _read_summary(uri: str) -> dict:
    try:
        summary = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as err:
        raise OutputError(f"{uri}: missing, so this audit output is incomplete; {RERUN}") from err
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or UTF-8
        reason = one_line(err, 200)
        raise OutputError(f"{uri}: not a readable summary ({reason}); {RERUN}") from err
    if not isinstance(summary, dict):
        raise OutputError(f"{uri}: not a summary (expected a JSON object); {RERUN}")
    return summary


def _summary_config(summary: dict, uri: str) -> AuditConfig:
    """The audit's configuration as recorded in its summary, validated."""
    if not isinstance(summary.get("config"), dict):
        raise OutputError(f"{uri}: no 'config' object, so the audit cannot be known; {RERUN}")
    detection = summary.get("detection")
    if detection is not None and not (
        isinstance(detection, dict) and detection.keys() >= DETECTION
    ):
        raise OutputError(f"{uri}: 'detection' lacks {', '.join(sorted(DETECTION))}; {RERUN}")
    try:
        return parse_model(AuditConfig, summary["config"], f"{uri} config")
    except EzmiaError as err:
        raise OutputError(f"{err}; this ezmia cannot read that config: {RERUN}") from err


def _needed_columns(config: AuditConfig, detection: dict | None) -> list[str]:
    """The score columns the summary is computed from, for this audit's mode."""
    needed = ["source_row", "ez_status", *SCORE_COLUMNS]
    if config.mode == "leakage":
        needed.append("is_member")
    if detection is not None:
        needed.append("flagged")
    return needed


def _read_scores(out: str, needed: list[str]) -> pa.Table:
    """Every scores part, in source order, refused when missing, unreadable or incomplete."""
    folder = storage.join(out, outputs.SCORES_DIR)
    files = outputs.part_files(out)
    if not files:
        raise OutputError(f"{folder}: no scores parts (*.parquet); {RERUN}")
    tables = []
    for file in files:
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(file)))
        except (pa.ArrowException, OSError) as err:
            reason = one_line(err, 200)
            raise OutputError(f"{file}: not a readable scores part ({reason}); {RERUN}") from err
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise OutputError(f"{file}: no column {missing[0]!r} in this scores part; {RERUN}")
        tables.append(table)
    try:
        scores = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as err:
        reason = one_line(err, 200)
        raise OutputError(
            f"{folder}: the scores parts do not fit together ({reason}); {RERUN}"
        ) from err
    if pc.count_distinct(scores.column("source_row")).as_py() != scores.num_rows:
        raise OutputError(f"{folder}: some rows appear twice (mixed runs?); {RERUN}")
    return scores.sort_by("source_row")
