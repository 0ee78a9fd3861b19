"""Adding a score is one function and one registry line: a toy score registered here shows up
in the per-row scores, the scores table, the summary, the index and the report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.audit import AuditResult
from ezmia.cli import main
from ezmia.data.schema import index_schema, scores_schema
from ezmia.fleet.index import index_row, write_index
from ezmia.report.html import render_report
from ezmia.stats.scores import SCORES, TokenStats, register, score_sequence
from tests.conftest import audit_args
from tests.data.test_schema import leakage_summary


@pytest.fixture
def toy():
    """The toy score, registered as a score module would register it; removed afterwards."""

    @register("toy", "Toy score", "#123456", higher="the reference finds the text unlikely")
    def toy_score(stats: TokenStats, zlib_size: int) -> float:
        """Toy: negated mean reference log-prob."""
        return float(-stats.lp_reference.mean())

    yield SCORES["toy"]
    del SCORES["toy"]


def test_a_registered_score_is_computed_per_row(toy):
    stats = TokenStats(np.array([-1.0, -2.0]), np.array([-3.0, -5.0]), np.array([True, False]))
    assert score_sequence(stats, 3, 10)["toy"] == 4.0
    assert toy.description == "Toy: negated mean reference log-prob."


def test_a_registered_score_is_in_the_scores_and_index_schemas(toy):
    schema = scores_schema(pa.string(), labelled=True, flagged=False, with_text=False)
    assert schema.field("toy").type == pa.float64()
    assert schema.names.index("toy") == schema.names.index("min_k_pp") + 1
    names = index_schema().names
    for metric in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
        assert {f"toy_{metric}", f"toy_{metric}_lo", f"toy_{metric}_hi"} <= set(names)


def test_a_registered_score_is_in_the_summary_index_row_and_report(toy, tmp_path):
    summary = leakage_summary()
    assert summary.metrics["toy"].auc > 0.5
    row = index_row(AuditResult(out=str(tmp_path), summary=summary), "data.parquet")
    assert row["toy_auc"] == summary.metrics["toy"].auc
    folder = write_index(str(tmp_path), [row])
    assert pq.read_table(folder).column("toy_auc").to_pylist() == [row["toy_auc"]]
    rng = np.random.default_rng(0)
    members = np.arange(60) % 2 == 0
    table = pa.table({**{c: rng.normal(size=60) + members for c in SCORES},
                      "ez_status": ["ok"] * 60, "is_member": members, "id": range(60)})  # fmt: skip
    doc = render_report(summary, table)
    assert f'<tr><th>Toy score</th><td class="num">{summary.metrics["toy"].auc:.3f}' in doc
    assert 'stroke="#123456"' in doc and "Toy score (AUC" in doc  # its ROC curve
    assert "Toy: negated mean reference log-prob. Higher: the reference finds" in doc


def test_an_audit_scores_writes_and_reports_a_registered_score(toy, models, tmp_path):
    out = tmp_path / "audit"
    args = audit_args(models, out, "--engine", "local", bootstrap_rounds=10)
    assert main(args) == 0
    scores = pq.read_table(out / "scores")
    values = np.array(scores.column("toy").to_pylist())
    assert np.isfinite(values).all() and (values > 0).all()  # negated log-probs
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["metrics"]["toy"]["auc"] <= 1
    assert "Toy score" in (out / "report.html").read_text()
