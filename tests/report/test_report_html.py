"""Tests of the self-contained HTML audit report."""

from __future__ import annotations

import html
import re

import numpy as np
import pyarrow as pa
import pytest

from ezmia.report.html import TOP_N, render_report
from ezmia.report.model import Summary

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
        "n_members": 200,
        "n_nonmembers": 200,
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
        "models": {"target": "org/gpt2-ft", "reference": "gpt2", "target_is_adapter": False},
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


def render(summary: dict, scores: pa.Table) -> str:
    """The report of a summary as ``summary.json`` holds it."""
    return render_report(Summary.model_validate(summary), scores)


def _top_ids(table: pa.Table, k: int = TOP_N) -> list[str]:
    rows = [r for r in table.to_pylist() if r["ez_status"] == "ok"]
    rows.sort(key=lambda r: -r["ez_score"])
    return [r["id"] for r in rows[:k]]


def _check_self_contained(doc: str) -> None:
    """One HTML document, no JavaScript in any form, nothing fetched from anywhere."""
    assert doc.startswith("<!DOCTYPE html>")
    assert doc.count("<html") == 1 and doc.count("</html>") == 1
    assert "<svg" in doc
    assert not re.search(r"<script\b|javascript:|\son[a-z]+\s*=", doc, re.IGNORECASE)
    assert not re.search(r"https?:|\b(src|href)\s*=|<link|<iframe|<object|@import|url\(", doc)


def _text(doc: str) -> str:
    """The document's visible text, tags dropped, entities decoded, whitespace collapsed."""
    doc = re.sub(r"<style>.*?</style>", "", doc, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", doc)).split())


def _resolved(m: dict) -> dict:
    """A score's metrics with an operating point at 1% FPR and 0.1% unresolved."""
    at = {"threshold": 3.583, "tp": 29, "n_members": 200, "fp": 2, "n_nonmembers": 200,
          "tpr": 0.145, "tpr_exact_ci95": [0.0993, 0.2015], "fpr": 0.01,
          "fpr_exact_ci95": [0.0012, 0.0357]}  # fmt: skip
    unresolved = {"fpr": 0.001, "needs_nonmembers": 1000, "upper_bound": 0.055,
                  "upper_bound_at_fpr": 0.005}  # fmt: skip
    return {**m, "tpr_at_0_1pct_fpr": None, "tpr_at_0_1pct_fpr_ci95": None,
            "operating_points": {"tpr_at_1pct_fpr": at},
            "unresolved": {"tpr_at_0_1pct_fpr": unresolved}}  # fmt: skip


@pytest.mark.parametrize("mode", ["leakage", "detection", "scores"])
def test_report_is_one_self_contained_document(mode: str) -> None:
    doc = render(_summary(mode), _scores())
    _check_self_contained(doc)
    assert "The fine-tuned model leaks its training data." in doc
    assert f"<h1>EZ-MIA privacy audit: {html.escape('gpt2-xsum <audit>')}</h1>" in doc


def test_leakage_report_has_metrics_roc_and_histogram() -> None:
    text = _text(render(_summary("leakage"), _scores()))
    assert "score AUC TPR @ 1% FPR TPR @ 0.1% FPR n" in text
    assert "EZ-MIA 0.900 [0.880, 0.920] 30.0% [20.0, 40.0] 10.0% [2.0, 20.0] 400" in text
    assert "Reference ratio 0.900 [0.880, 0.920]" in text
    assert "ROC curves" in text and "false positive rate (log scale)" in text
    assert "EZ-MIA (AUC 0.900)" in text and "zlib (AUC " in text
    assert "members (n=200)" in text and "non-members (n=195)" in text
    assert "Min-K%++: all values are NaN under the vllm backend" in text


def test_roc_curves_take_each_score_colour_and_width_from_the_registry() -> None:
    doc = render(_summary("leakage"), _scores())
    assert '<polyline points="' in doc
    assert 'stroke="#d62728" stroke-width="2.6"/>' in doc  # EZ, drawn thicker
    assert 'stroke="#1f77b4" stroke-width="1.6"/>' in doc  # LOSS


def test_unresolved_tpr_is_nr_with_the_non_members_it_needs_and_its_bound() -> None:
    summary = _summary("leakage")
    summary["metrics"]["ez_score"] = _resolved(summary["metrics"]["ez_score"])
    text = _text(render(summary, _scores()))
    assert (
        "EZ-MIA 0.900 [0.880, 0.920] 30.0% [20.0, 40.0] n/r needs 1000 non-members; at most "
        "5.5% (the TPR at 0.50% FPR) 400" in text
    )


def test_operating_points_show_counts_and_exact_intervals() -> None:
    summary = _summary("leakage")
    summary["metrics"]["ez_score"] = _resolved(summary["metrics"]["ez_score"])
    text = _text(render(summary, _scores()))
    assert "Operating points" in text and "Clopper-Pearson" in text
    assert "EZ-MIA 1% 3.583 29 of 200 14.5% [9.9, 20.2] 2 of 200 1.00% [0.1, 3.6]" in text


def test_operating_points_are_absent_without_any() -> None:
    assert "Operating points" not in _text(render(_summary("leakage"), _scores()))


@pytest.mark.parametrize("distinguishable", [True, False])
def test_blind_baseline_auc_and_whether_it_flags_the_split(distinguishable: bool) -> None:
    summary = _summary("leakage")
    auc, ci = (0.71, [0.65, 0.77]) if distinguishable else (0.52, [0.45, 0.58])
    summary["blind_baseline"] = {"auc": auc, "auc_ci95": ci, "n": 400, "limit": 0.6,
                                 "distinguishable": distinguishable}  # fmt: skip
    text = _text(render(summary, _scores()))
    if distinguishable:
        assert "AUC 0.710 [0.650, 0.770] over 400 rows: the split is distinguishable" in text
    else:
        assert "AUC 0.520 [0.450, 0.580] over 400 rows: the split is not distinguishable" in text


def test_verdict_box_shows_level_warnings_and_privacy_line() -> None:
    summary = _summary("leakage")
    summary["verdict"] |= {"warnings": ["The split differs."],
                           "privacy": "Empirical privacy: epsilon >= 1.18."}  # fmt: skip
    doc = render(summary, _scores())
    verdict = _text(doc[doc.index('<div class="verdict"') : doc.index("</div>")])
    assert verdict == (
        "Leakage risk: high The fine-tuned model leaks its training data. Warning: The split "
        "differs. Empirical privacy: epsilon >= 1.18."
    )
    assert 'style="border-color:#b91c1c;background:#fdecec"' in doc


def test_detection_report_shows_threshold_and_flagged() -> None:
    table = _scores().append_column("flagged", pa.array(np.arange(400) % 10 == 0))
    doc = render(_summary("detection"), table.drop_columns(["is_member"]))
    text = _text(doc)
    assert "Detection: high" in text
    assert "target FPR 1.00% EZ threshold 2.5 flagged 42 of 400 (10.5%) calibration" in text
    assert "threshold 2.5" in text  # the line on the histogram
    assert "flagged (n=" in text and "not flagged (n=" in text
    assert "ROC curves" not in text and "Attack performance" not in text


def test_scores_mode_plots_all_rows_without_metrics() -> None:
    text = _text(render(_summary("scores"), _scores()))
    assert "EZ score distribution" in text and "all rows (n=395)" in text
    assert "Attack performance" not in text and "ROC curves" not in text


def test_status_counts_with_share_and_meaning() -> None:
    text = _text(render(_summary(), _scores()))
    assert "ok 395 98.8% EZ score computed normally." in text
    assert "too_short 1 0.2% Fewer than 3 tokens" in text


def test_run_details_show_backend_and_timings() -> None:
    text = _text(render(_summary(), _scores()))
    assert "backend vllm backend choice GPU available time: load 1.5 s time: score 12.2 s" in text


def test_top_records_appear_in_order_of_ez_score() -> None:
    table = _scores()
    doc = render(_summary(), table)
    top = doc[doc.index("Records that leak most") : doc.index("Rows scored 0.0")]
    positions = [top.index(f">{rec_id}<") for rec_id in _top_ids(table)]
    assert positions == sorted(positions) and len(positions) == TOP_N


def test_edge_case_rows_are_listed_for_review() -> None:
    doc = render(_summary(), _scores())
    text = _text(doc[doc.index("Rows scored 0.0 that may leak") :])
    assert text.startswith("Rows scored 0.0 that may leak 3 row(s) score 0.0")
    assert "rec-0001" in text and "rec-0003" in text and "rec-0005" in text
    assert "no_negative_shift" in text and "strongest member evidence" in _text(doc)


def test_text_from_data_is_escaped_everywhere() -> None:
    summary = _summary("leakage")
    summary["name"] = f"run {XSS}"
    summary["verdict"] |= {"text": XSS, "warnings": [XSS], "privacy": XSS}
    summary["metrics_skipped"] = {XSS: XSS}
    summary["status_counts"][XSS] = 1
    summary["config"] |= {XSS: XSS, "tags": [XSS]}
    summary["backend"] = {"name": XSS, "reason": XSS}
    table = _scores()
    ids = table.column("id").to_pylist()
    ids[11] = XSS  # the top row, shown with its text
    table = table.set_column(0, "id", pa.array(ids))
    doc = render(summary, table)
    _check_self_contained(doc)
    assert "<script" not in doc.lower()
    assert doc.count(html.escape(XSS)) >= 10


def test_texts_absent_without_text_column() -> None:
    doc = render(_summary(), _scores(with_text=False))
    assert "lorem ipsum" not in doc and "leaky" not in doc
    assert "<th>text</th>" not in doc


def test_long_texts_are_truncated() -> None:
    doc = render(_summary(), _scores())
    assert ("lorem ipsum " * 40) not in doc
    assert "text number 1 " + "lorem ipsum " * 23 + "lorem ipsu\u2026" in doc


def test_secrets_in_config_are_redacted() -> None:
    text = _text(render(_summary(), _scores()))
    assert "SUPERSECRET" not in text
    assert "s3.secret_access_key (redacted)" in text
    assert "target.model org/gpt2-ft" in text


def test_an_all_nan_score_draws_no_roc_curve() -> None:
    table = _scores()
    nan = pa.array(np.full(table.num_rows, np.nan))
    table = table.set_column(table.column_names.index("min_k_pp"), "min_k_pp", nan)
    doc = render(_summary(), table)
    _check_self_contained(doc)
    assert "Min-K%++ (AUC" not in doc and "Min-K% (AUC" in doc


def test_degenerate_inputs_say_what_is_missing() -> None:
    empty = _scores().slice(0, 0)
    text = _text(render({**_summary(), "metrics": {}, "n_rows": 0}, empty))
    assert "0 records · mode: leakage" in text and "No metrics." in text
    assert "No rows with status ok to plot." in text and "No ok rows." in text
    one_class = _scores().filter(pa.array(np.arange(400) % 2 == 0))
    assert "ROC needs finite scores" in render(_summary(), one_class)
    bare = _text(render(_summary("scores"), _scores(with_text=False).drop_columns(["is_member"])))
    assert "400 records · mode: scores" in bare and "ROC curves" not in bare
