"""The table schemas analysts query: the scores table's layout and the index's columns, both
generated from the score registry and the metrics list."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ezmia.audit import AuditResult
from ezmia.data.schema import SCHEMA_VERSION, index_schema, scores_schema
from ezmia.fleet.index import index_row
from ezmia.report.model import Summary
from ezmia.report.summary import build_summary
from ezmia.stats.metrics import METRICS
from ezmia.stats.scores import SCORES


def leakage_summary(n: int = 300, seed: int = 0) -> Summary:
    """A leakage audit's summary over random scores (members shifted up), as audit writes it:
    150 non-members resolve 1% FPR but not 0.1%."""
    rng = np.random.default_rng(seed)
    members = np.arange(n) % 2 == 0
    columns = {name: rng.normal(size=n) + members for name in SCORES}
    table = pa.table({**columns, "ez_status": ["ok"] * n, "is_member": members})
    summary = build_summary(table, mode="leakage", bootstrap_rounds=20, seed=0, detection=None)
    return Summary(**summary.dump(), name="ckpt", config={},
                   models={"target": "t", "reference": "r", "target_is_adapter": False,
                           "fingerprints": {"target": "abc"}},
                   backend={"name": "torch", "reason": "no GPU"})  # fmt: skip


def test_scores_table_keeps_its_column_layout():
    schema = scores_schema(pa.string(), labelled=True, flagged=True, with_text=True)
    assert schema.names == [
        "id", "ez_score", "ez_status", "n_tokens", "n_scored", "n_errors", "truncated",
        "loss", "ref_ratio", "zlib", "min_k", "min_k_pp",
        "text_sha256", "source_row", "backend", "is_member", "flagged", "text",
    ]  # fmt: skip
    assert all(schema.field(c).type == pa.float64() for c in SCORES)
    assert schema.field("id").type == pa.string()


def test_scores_table_has_label_flag_and_text_only_when_asked():
    bare = scores_schema(pa.int64(), labelled=False, flagged=False, with_text=False)
    assert bare.names[-3:] == ["text_sha256", "source_row", "backend"]
    assert bare.field("id").type == pa.int64()


def test_index_has_a_value_and_interval_per_score_and_metric():
    names = index_schema().names
    metric_columns = [f"{score}_{metric}" for score in SCORES for metric in METRICS]
    assert METRICS == ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")
    assert metric_columns[:3] == ["ez_score_auc", "ez_score_tpr_at_1pct_fpr",
                                    "ez_score_tpr_at_0_1pct_fpr"]  # fmt: skip
    block = names[names.index("backend") + 1 : names.index("verdict")]  # nothing else between
    assert block == [f"{c}{end}" for c in metric_columns for end in ("", "_lo", "_hi")]
    assert block[0] == "ez_score_auc" and block[-1] == "min_k_pp_tpr_at_0_1pct_fpr_hi"


def test_every_table_carries_the_schema_version():
    version = {b"ezmia_schema_version": str(SCHEMA_VERSION).encode()}
    assert index_schema().metadata == version
    assert scores_schema(pa.string(), True, False, False).metadata == version


def test_an_index_row_fills_every_index_column():
    summary = leakage_summary()
    row = index_row(AuditResult(out="/tmp/audit", summary=summary), "data.parquet")
    assert set(row) == set(index_schema().names)
    stored = pa.Table.from_pylist([row], schema=index_schema()).to_pylist()[0]
    ez = summary.metrics["ez_score"]
    assert stored["ez_score_auc"] == ez.auc
    assert [stored["loss_auc_lo"], stored["loss_auc_hi"]] == summary.metrics["loss"].auc_ci95
    assert stored["ez_score_tpr_at_1pct_fpr"] == ez.tpr_at_1pct_fpr is not None
    assert stored["ez_score_tpr_at_0_1pct_fpr"] is None  # 150 non-members cannot resolve 0.1%
    assert stored["report_uri"] == "/tmp/audit/report.html"
