"""Re-rendering an audit's summary and report from its scores (``ezmia report OUT``)."""

from __future__ import annotations

from ezmia import outputs, storage
from ezmia.config import AuditConfig
from ezmia.errors import OutputError
from ezmia.report_html import render_report
from ezmia.summary import build_summary


def rerender(out: str) -> str:
    """Recompute the summary's metrics from ``scores/`` and rewrite summary and report."""
    if not outputs.is_complete(out):
        raise OutputError(f"{out}: no _SUCCESS, so this audit did not finish; rerun the audit")
    summary = outputs.read_json(storage.join(out, outputs.SUMMARY))
    config = AuditConfig.model_validate(summary["config"])
    scores = outputs.read_scores(out)
    summary.update(
        build_summary(
            scores,
            mode=config.mode,
            bootstrap_rounds=config.bootstrap_rounds,
            seed=config.seed,
            detection=summary.get("detection"),
        )
    )
    encryption = storage.Encryption(config.sse, config.sse_kms_key_id)
    outputs.write_json(storage.join(out, outputs.SUMMARY), summary, encryption)
    report = storage.join(out, outputs.REPORT)
    storage.write_bytes(report, render_report(summary, scores).encode(), encryption)
    return report
