"""The verdict: its levels at, just below and just above every limit of ``VERDICT_RULES``, and
"insufficient" when too few rows were scored to support any verdict."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from ezmia.cli import main
from ezmia.scores import EZ_OK, EZ_STATUSES, EZ_TOO_FEW_ERRORS, SCORE_COLUMNS
from ezmia.summary import (
    MIN_SCORED_MEMBERS,
    MIN_SCORED_NONMEMBERS,
    VERDICT_RULES,
    build_summary,
    verdict,
)
from tests.conftest import audit_args

LIMITS = {(level, key): limit for level, key, limit in VERDICT_RULES}
QUIET = {"auc": 0.5, "tpr_at_1pct_fpr": 0.0, "tpr_at_0_1pct_fpr": 0.0}  # no rule applies


def below(limit: float) -> float:
    return math.nextafter(limit, -math.inf)


def above(limit: float) -> float:
    return math.nextafter(limit, math.inf)


def level_with(key: str, value: float) -> str:
    return verdict({"ez_score": {**QUIET, key: value}})["level"]


def test_every_rule_is_covered_and_quiet_metrics_are_low():
    assert set(LIMITS) == {("high", "auc"), ("high", "tpr_at_0_1pct_fpr"),
                           ("moderate", "auc"), ("moderate", "tpr_at_1pct_fpr")}  # fmt: skip
    assert LIMITS["moderate", "auc"] < LIMITS["high", "auc"]
    assert verdict({"ez_score": QUIET})["level"] == "low"


@pytest.mark.parametrize(
    ("level", "key", "at_or_below"),
    [
        ("high", "tpr_at_0_1pct_fpr", "low"),
        ("high", "auc", "moderate"),  # still above the moderate AUC limit
        ("moderate", "tpr_at_1pct_fpr", "low"),
        ("moderate", "auc", "low"),
    ],
)
def test_a_metric_equal_to_its_limit_stays_within_it(level, key, at_or_below):
    limit = LIMITS[level, key]
    assert level_with(key, below(limit)) == at_or_below
    assert level_with(key, limit) == at_or_below
    assert level_with(key, above(limit)) == level


def scores_table(statuses: list[tuple[bool, str]]) -> pa.Table:
    """A scores table: members score 1.0 and non-members 0.0 (a perfectly leaking model)."""
    members = [member for member, _ in statuses]
    values = [1.0 if member else 0.0 for member in members]
    columns = {name: pa.array(values, pa.float64()) for name in SCORE_COLUMNS}
    return pa.table({**columns, "ez_status": [s for _, s in statuses], "is_member": members})


def summary_of(statuses: list[tuple[bool, str]]) -> dict:
    table = scores_table(statuses)
    return build_summary(table, mode="leakage", bootstrap_rounds=0, seed=0, detection=None)


def rows(member: bool, ok: int, unscored: int = 0) -> list[tuple[bool, str]]:
    return [(member, EZ_OK)] * ok + [(member, EZ_TOO_FEW_ERRORS)] * unscored


def test_the_fewest_scored_rows_give_a_verdict():
    summary = summary_of(rows(True, MIN_SCORED_MEMBERS) + rows(False, MIN_SCORED_NONMEMBERS))
    assert summary["verdict"]["level"] == "high"


@pytest.mark.parametrize(
    ("members", "nonmembers"),
    [(MIN_SCORED_MEMBERS - 1, MIN_SCORED_NONMEMBERS), (MIN_SCORED_MEMBERS,
                                                       MIN_SCORED_NONMEMBERS - 1)],
    ids=["one-member-short", "one-nonmember-short"],
)  # fmt: skip
def test_one_scored_row_short_is_insufficient_whatever_the_metrics(members, nonmembers):
    summary = summary_of(rows(True, members, 5) + rows(False, nonmembers, 5))
    assert summary["metrics"]["ez_score"]["auc"] == 1.0  # the metrics alone would say "high"
    assert summary["verdict"]["level"] == "insufficient"
    text = summary["verdict"]["text"]
    assert f"{members} members and {nonmembers} non-members were scored" in text
    assert f"at least {MIN_SCORED_MEMBERS} of each" in text and "10 too_few_errors" in text


@pytest.mark.parametrize("status", [s for s in EZ_STATUSES if s != EZ_OK])
def test_rows_that_were_not_scored_do_not_count(status):
    statuses = [(True, status)] * 30 + [(False, status)] * 30
    assert summary_of(statuses)["verdict"]["level"] == "insufficient"


def test_audit_of_unscorable_rows_reports_insufficient_not_safe(models, tmp_path, capsys):
    """Two tokens are too short to score: every row is too_short (the full fine-tune leaks
    at an AUC near 1 with longer texts)."""
    out = tmp_path / "out"
    assert main(audit_args(models, out, max_length=2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"]["level"] == "insufficient"
    assert summary["status_counts"][EZ_OK] == 0
    assert "0 members and 0 non-members were scored" in summary["verdict"]["text"]
    assert "Too few scored rows for a verdict" in capsys.readouterr().out
    report = (out / "report.html").read_text()
    assert "Leakage risk: insufficient" in report and "0 members and 0 non-members" in report
