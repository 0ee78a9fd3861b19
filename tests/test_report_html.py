"""Tests of the self-contained HTML audit report."""

from __future__ import annotations

import html
import re

import numpy as np
import pyarrow as pa
import pytest

from ezmia.report_html import TOP_N, render_report

XSS = "<script>alert(1)</script>"


def _scores(n: int = 400, with_text: bool = True, seed: int = 0) -> pa.Table:
    """Synthetic scores: members score higher; a few edge-case statuses; min_k_pp all null."""
    rng = np.random.default_rng(seed)
    is_member = np.arange(n) % 2 == 0
    ez = np.exp(rng.normal(0.0, 0.5, n) + 0.8 * is_member)
    status = np.array(["ok"] * n, dtype=object)
    status[[1, 3]] = "too_few_errors"
    status[[5]] = "no_negative_shift"
    status[[7]] = "too_short"
    status[[9]] = "empty"
    ez[status != "ok"] = 0.0
    ez[11] = 1e6  # an outlier that must not squash the histogram
    columns = {
        "id": [f"rec-{i:04d}" for i in range(n)],
        "ez_score": ez,
        "ez_status": status.tolist(),
        "n_tokens": rng.integers(3, 128, n),
        "loss": rng.normal(-3, 1, n) + is_member,
        "ref_ratio": rng.normal(0, 1, n) + 0.5 * is_member,
        "zlib": rng.normal(-0.05, 0.01, n),
        "min_k": rng.normal(-6, 1, n) + 0.3 * is_member,
        "min_k_pp": pa.nulls(n, pa.float64()),
        "is_member": is_member,
    }
    if with_text:
        texts = [f"text number {i} " + "lorem ipsum " * 40 for i in range(n)]
        texts[11] = f"leaky {XSS} record"
        columns["text"] = texts
    return pa.table(columns)


def _metric(auc: float) -> dict:
    return {
        "auc": auc,
        "auc_ci95": [auc - 0.02, auc + 0.02],
        "tpr_at_1pct_fpr": 0.3,
        "tpr_at_1pct_fpr_ci95": [0.2, 0.4],
        "tpr_at_0_1pct_fpr": 0.1,
        "tpr_at_0_1pct_fpr_ci95": [0.02, 0.2],
        "n": 400,
    }


def _summary(mode: str = "leakage") -> dict:
    summary = {
        "name": "gpt2-xsum <audit>",
        "n_rows": 400,
        "status_counts": {
            "ok": 395,
            "too_few_errors": 2,
            "no_negative_shift": 1,
            "too_short": 1,
            "empty": 1,
        },
        "mode": mode,
        "metrics_skipped": {"min_k_pp": "all values are NaN under the vllm backend"},
        "verdict": {"level": "high", "text": "The fine-tuned model leaks its training data."},
        "backend": {"name": "vllm", "reason": "GPU available"},
        "config": {
            "target": {"model": "org/gpt2-ft", "revision": "main"},
            "reference": {"model": "gpt2"},
            "data": {"members": "s3://bucket/members.parquet", "max_length": 128},
            "s3": {"secret_access_key": "SUPERSECRET"},
        },
        "models": {"target": "org/gpt2-ft", "reference": "gpt2"},
        "timings": {"load": 1.5, "score": 12.25},
    }
    if mode == "leakage":
        summary["metrics"] = {c: _metric(0.9) for c in ("ez_score", "loss", "ref_ratio")}
    if mode == "detection":
        summary["detection"] = {
            "fpr": 0.01,
            "threshold": 2.5,
            "n_flagged": 42,
            "n_candidates": 400,
            "n_calibration": 1000,
        }
    return summary


def _top_ids(table: pa.Table, k: int = TOP_N) -> list[str]:
    rows = [r for r in table.to_pylist() if r["ez_status"] == "ok"]
    rows.sort(key=lambda r: -r["ez_score"])
    return [r["id"] for r in rows[:k]]


def _check_self_contained(doc: str) -> None:
    assert doc.startswith("<!DOCTYPE html>")
    assert doc.count("<html") == 1 and doc.count("</html>") == 1
    assert "<svg" in doc
    assert "http://" not in doc and "https://" not in doc
    assert not re.search(r"<script\b", doc, re.IGNORECASE)
    assert "<link" not in doc and "@import" not in doc and "url(" not in doc


@pytest.mark.parametrize("mode", ["leakage", "detection", "scores"])
def test_report_is_one_self_contained_document(mode: str) -> None:
    doc = render_report(_summary(mode), _scores())
    _check_self_contained(doc)
    assert "The fine-tuned model leaks its training data." in doc
    assert html.escape("gpt2-xsum <audit>") in doc


def test_leakage_report_has_metrics_roc_and_histogram() -> None:
    doc = render_report(_summary("leakage"), _scores())
    assert "TPR @ 1% FPR" in doc and "TPR @ 0.1% FPR" in doc
    assert "0.900" in doc and "[0.880, 0.920]" in doc
    assert "ROC curves" in doc and "false positive rate (log scale)" in doc
    assert doc.count("<svg") == 2
    assert "members (n=" in doc and "non-members (n=" in doc
    assert "all values are NaN under the vllm backend" in doc


def test_detection_report_shows_threshold_and_flagged() -> None:
    table = _scores().append_column("flagged", pa.array(np.arange(400) % 10 == 0))
    doc = render_report(_summary("detection"), table.drop_columns(["is_member"]))
    assert "EZ threshold" in doc and "2.5" in doc
    assert "42 of 400" in doc
    assert "threshold 2.5" in doc  # the line on the histogram
    assert "ROC curves" not in doc


def test_top_records_appear() -> None:
    table = _scores()
    doc = render_report(_summary(), table)
    for rec_id in _top_ids(table):
        assert rec_id in doc


def test_edge_case_rows_are_listed_for_review() -> None:
    doc = render_report(_summary(), _scores())
    assert "no_negative_shift" in doc and "strongest member evidence" in doc
    assert "rec-0005" in doc  # the no_negative_shift row


def test_text_is_escaped() -> None:
    doc = render_report(_summary(), _scores())
    assert XSS not in doc
    assert html.escape(XSS) in doc


def test_texts_absent_without_text_column() -> None:
    doc = render_report(_summary(), _scores(with_text=False))
    assert "lorem ipsum" not in doc and "leaky" not in doc
    assert "<th>text</th>" not in doc


def test_long_texts_are_truncated() -> None:
    doc = render_report(_summary(), _scores())
    assert ("lorem ipsum " * 40) not in doc
    assert "\u2026" in doc


def test_secrets_in_config_are_redacted() -> None:
    doc = render_report(_summary(), _scores())
    assert "SUPERSECRET" not in doc


def test_all_nan_min_k_pp_does_not_crash() -> None:
    table = _scores()
    nan = pa.array(np.full(table.num_rows, np.nan))
    table = table.set_column(table.column_names.index("min_k_pp"), "min_k_pp", nan)
    doc = render_report(_summary(), table)
    _check_self_contained(doc)
    assert "Min-K%++ (AUC" not in doc  # no ROC curve for an all-NaN score


def test_degenerate_inputs_do_not_crash() -> None:
    empty = _scores().slice(0, 0)
    doc = render_report({"name": "empty", "mode": "leakage"}, empty)
    assert doc.startswith("<!DOCTYPE html>")
    one_class = _scores().filter(pa.array(np.arange(400) % 2 == 0))
    doc = render_report(_summary(), one_class)
    assert "ROC needs finite scores" in doc
    assert render_report({}, _scores(with_text=False).drop_columns(["is_member"]))
