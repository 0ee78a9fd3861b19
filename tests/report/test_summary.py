"""The verdict: its levels at, just below and just above every limit of ``VERDICT_RULES``, and
"insufficient" when too few rows were scored to support any verdict."""

from __future__ import annotations

import json
import math
import random
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.cli import main
from ezmia.demo.corpus import _SKIP_DIRS, _file_docstrings
from ezmia.report.model import Detection, Summary, SummaryData
from ezmia.report.summary import (
    MIN_SCORED_MEMBERS,
    MIN_SCORED_NONMEMBERS,
    VERDICT_RULES,
    build_summary,
    detection_verdict,
    verdict,
)
from ezmia.stats.scores import EZ_OK, EZ_STATUSES, EZ_TOO_FEW_ERRORS, SCORE_COLUMNS
from tests.conftest import audit_args
from tests.factories import metrics

LIMITS = {(level, key): limit for level, key, limit in VERDICT_RULES}
NOTHING_FLAGGED = {"tpr": 0.0, "tpr_exact_ci95": [0.0, 0.004]}
QUIET = {  # no rule applies; 1000 non-members resolve both reported rates
    "auc": 0.5,
    "tpr_at_1pct_fpr": 0.0,
    "tpr_at_0_1pct_fpr": 0.0,
    "n_nonmembers": 1000,
    "operating_points": {"tpr_at_1pct_fpr": NOTHING_FLAGGED, "tpr_at_0_1pct_fpr": NOTHING_FLAGGED},
}


def below(limit: float) -> float:
    return math.nextafter(limit, -math.inf)


def above(limit: float) -> float:
    return math.nextafter(limit, math.inf)


def level_with(key: str, value: float) -> str:
    return verdict({"ez_score": metrics({**QUIET, key: value})}).level


def test_every_rule_is_covered_and_quiet_metrics_are_low():
    assert set(LIMITS) == {("high", "auc"), ("high", "tpr_at_0_1pct_fpr"),
                           ("moderate", "auc"), ("moderate", "tpr_at_1pct_fpr")}  # fmt: skip
    assert LIMITS["moderate", "auc"] < LIMITS["high", "auc"]
    assert verdict({"ez_score": metrics(QUIET)}).level == "low"


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


def summary_of(statuses: list[tuple[bool, str]]) -> SummaryData:
    table = scores_table(statuses)
    return build_summary(table, mode="leakage", bootstrap_rounds=0, seed=0, detection=None)


def rows(member: bool, ok: int, unscored: int = 0) -> list[tuple[bool, str]]:
    return [(member, EZ_OK)] * ok + [(member, EZ_TOO_FEW_ERRORS)] * unscored


def test_the_fewest_scored_rows_give_a_verdict():
    summary = summary_of(rows(True, MIN_SCORED_MEMBERS) + rows(False, MIN_SCORED_NONMEMBERS))
    assert summary.verdict.level == "high"


@pytest.mark.parametrize(
    ("members", "nonmembers"),
    [(MIN_SCORED_MEMBERS - 1, MIN_SCORED_NONMEMBERS), (MIN_SCORED_MEMBERS,
                                                       MIN_SCORED_NONMEMBERS - 1)],
    ids=["one-member-short", "one-nonmember-short"],
)  # fmt: skip
def test_one_scored_row_short_is_insufficient_whatever_the_metrics(members, nonmembers):
    summary = summary_of(rows(True, members, 5) + rows(False, nonmembers, 5))
    assert summary.metrics["ez_score"].auc == 1.0  # the metrics alone would say "high"
    assert summary.verdict.level == "insufficient"
    text = summary.verdict.text
    assert f"{members} members and {nonmembers} non-members were scored" in text
    assert f"at least {MIN_SCORED_MEMBERS} of each" in text and "10 too_few_errors" in text


@pytest.mark.parametrize("status", [s for s in EZ_STATUSES if s != EZ_OK])
def test_rows_that_were_not_scored_do_not_count(status):
    statuses = [(True, status)] * 30 + [(False, status)] * 30
    assert summary_of(statuses).verdict.level == "insufficient"


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


def leakage_table(n_members: int, n_nonmembers: int, strong: str, seed: int = 0) -> pa.Table:
    """Scores where ``strong`` separates members perfectly and every other score is noise."""
    rng = np.random.default_rng(seed)
    members = np.r_[np.ones(n_members, bool), np.zeros(n_nonmembers, bool)]
    columns = {name: pa.array(rng.random(members.size)) for name in SCORE_COLUMNS}
    columns[strong] = pa.array(members + rng.random(members.size) * 0.5)
    statuses = [EZ_OK] * members.size
    return pa.table({**columns, "ez_status": statuses, "is_member": members})


def test_the_strongest_attack_decides_and_is_named_beside_ez():
    table = leakage_table(200, 1000, strong="ref_ratio")
    summary = build_summary(table, mode="leakage", bootstrap_rounds=0, seed=0, detection=None)
    found = summary.verdict
    assert (found.level, found.score, found.fpr) == ("high", "ref_ratio", 0.001)
    assert "At 0.1% false positives" in found.text and "Reference ratio" in found.text
    assert "identifies 100.0% of the training records" in found.text
    assert "EZ: " in found.text  # EZ's own figures stay in view
    assert summary.metrics["ez_score"].auc < 0.6


def test_the_headline_uses_the_lowest_rate_the_non_members_resolve():
    table = leakage_table(200, 150, strong="ez_score")
    summary = build_summary(table, mode="leakage", bootstrap_rounds=0, seed=0, detection=None)
    assert summary.verdict.fpr == 0.01
    assert "At 1.0% false positives (the lowest rate 150 non-members resolve)" in (
        summary.verdict.text
    )
    assert "0.1%" not in summary.verdict.text
    assert summary.metrics["ez_score"].tpr_at_0_1pct_fpr is None


@pytest.mark.parametrize(("claimed", "claim"), [(0.5, "refuted"), (50.0, "not refuted")])
def test_a_claimed_epsilon_is_refuted_only_below_the_bound(claimed, claim):
    table = leakage_table(500, 500, strong="ez_score")
    summary = build_summary(
        table, mode="leakage", bootstrap_rounds=0, seed=0, detection=None, claimed_epsilon=claimed
    )
    privacy = summary.privacy
    assert privacy.epsilon_lower_bound > 3 and privacy.claim == claim
    assert f"The claimed epsilon {claimed:g} is {claim}." in summary.verdict.privacy


def by_package_split(n: int) -> tuple[list[str], list[str]]:
    """Docstrings of stdlib modules a-l as members, m-z as non-members (a biased split)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    first, second = [], []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not _SKIP_DIRS.intersection(parts[:-1]):
            side = first if parts[0] < "m" else second
            side += [d for d in _file_docstrings(path) if len(d) >= 200]
    rng = random.Random(0)
    return rng.sample(first, n), rng.sample(second, n)


def test_an_audit_of_a_split_biased_by_source_warns_and_a_random_one_does_not(models, tmp_path):
    members, nonmembers = by_package_split(120)
    for name, texts in (("members", members), ("nonmembers", nonmembers)):
        pq.write_table(pa.table({"text": texts}), tmp_path / f"{name}.parquet")
    out = tmp_path / "biased"
    args = ["audit", "--target", str(models.full), "--reference", str(models.base),
            "--members", str(tmp_path / "members.parquet"), "--nonmembers",
            str(tmp_path / "nonmembers.parquet"), "--out", str(out), "--max-length", "32",
            "--bootstrap-rounds", "50"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["blind_baseline"]["distinguishable"] is True
    assert "told apart without the model" in summary["verdict"]["warnings"][0]
    assert "told apart without the model" in (out / "report.html").read_text()
    random_split = tmp_path / "random"
    assert main(audit_args(models, random_split, bootstrap_rounds=50)) == 0
    summary = json.loads((random_split / "summary.json").read_text())
    assert summary["blind_baseline"]["distinguishable"] is False
    assert summary["verdict"]["warnings"] == []


def test_detection_says_whether_more_candidates_are_flagged_than_chance_would():
    detection = {"fpr": 0.01, "threshold": 1.0, "n_calibration": 1000, "n_candidates": 100}
    assert detection_verdict(Detection(**detection, n_flagged=2)).level == "no evidence"
    likely = detection_verdict(Detection(**detection, n_flagged=30))
    assert likely.level == "members likely" and "30 of 100 candidates" in likely.text


LAYOUTS = Path(__file__).parents[1] / "summary_json"  # written by ezmia at commit efb63a9


@pytest.mark.parametrize("path", sorted(LAYOUTS.glob("*.json")), ids=lambda p: p.stem)
def test_a_summary_json_of_before_the_typed_summary_round_trips_byte_for_byte(path):
    text = path.read_bytes()
    model = SummaryData if path.stem.startswith("data_") else Summary
    assert model.model_validate(json.loads(text)).to_json() == text


def test_keys_this_version_does_not_know_are_kept():
    written = json.loads((LAYOUTS / "leakage.json").read_bytes())
    written |= {"reviewer": {"ticket": 7}}
    written["verdict"] |= {"signed_off": False}
    written["metrics"]["loss"] |= {"tpr_at_5pct_fpr": 0.25}
    assert Summary.model_validate(written).dump() == written


def test_a_leakage_summary_keeps_its_layout_and_names_each_skipped_score():
    table = leakage_table(200, 1000, strong="ez_score")
    nan = pa.array(np.full(table.num_rows, np.nan))
    table = table.set_column(table.schema.get_field_index("min_k_pp"), "min_k_pp", nan)
    written = build_summary(table, mode="leakage", bootstrap_rounds=0, seed=0, detection=None)
    before = json.loads((LAYOUTS / "data_resolved.json").read_bytes())
    assert list(written.dump()) == list(before)
    assert written.metrics_skipped == before["metrics_skipped"]
    assert "min_k_pp" not in written.metrics
