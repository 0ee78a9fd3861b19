"""The scan policy: thresholds and overrides, the pass/fail boundary (shared with the verdict),
insufficient audits, and sidecar keys only the operator may set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ezmia.errors import InputError
from ezmia.fleet.policy import METRICS, OPERATOR_ONLY, Policy, Thresholds, judge, read_options
from ezmia.report.model import Summary, SummaryData
from ezmia.report.summary import VERDICT_RULES, verdict
from tests.factories import data, metrics

NOTHING_FLAGGED = {"tpr": 0.0, "tpr_exact_ci95": [0.0, 0.004]}
QUIET = {  # 1000 non-members resolve both reported rates
    "auc": 0.5,
    "tpr_at_1pct_fpr": 0.0,
    "tpr_at_0_1pct_fpr": 0.0,
    "n_nonmembers": 1000,
    "operating_points": {"tpr_at_1pct_fpr": NOTHING_FLAGGED, "tpr_at_0_1pct_fpr": NOTHING_FLAGGED},
}
DEFAULT_LIMITS = {v for v in Thresholds().model_dump(exclude={"score"}).values() if v is not None}


def leakage(**ez: float) -> SummaryData:
    scores = {"ez_score": metrics({**QUIET, **ez})}
    return data(metrics=scores, verdict=verdict(scores))


def test_overrides_apply_in_order():
    policy = Policy(
        thresholds=Thresholds(max_auc=0.6),
        overrides=[{"match": "prod/*", "max_tpr_at_0_1pct_fpr": 0.0},
                   {"match": "prod/legacy/*", "max_auc": None}],
    )  # fmt: skip
    summary = leakage(auc=0.7, tpr_at_1pct_fpr=0.02, tpr_at_0_1pct_fpr=0.01)
    assert judge(summary, policy.thresholds_for("dev/x")).breaches == [
        "EZ auc 0.7000 > max_auc 0.6"
    ]
    assert len(judge(summary, policy.thresholds_for("prod/x")).breaches) == 2
    assert len(judge(summary, policy.thresholds_for("prod/legacy/x")).breaches) == 1
    assert judge(data(mode="detection"), Thresholds()).verdict == "fail"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("limit", sorted(DEFAULT_LIMITS | {0.0, 1.0}))
def test_a_metric_equal_to_its_limit_passes_and_just_above_fails(metric, limit):
    thresholds = Thresholds(**{f"max_{m}": None for m in METRICS} | {f"max_{metric}": limit})
    if limit > 0:
        assert judge(leakage(**{metric: math.nextafter(limit, -1)}), thresholds).verdict == "pass"
    assert judge(leakage(**{metric: limit}), thresholds).verdict == "pass"
    if limit < 1:
        above = judge(leakage(**{metric: math.nextafter(limit, 2)}), thresholds)
        assert above.verdict == "fail" and above.breaches[0].startswith(f"EZ {metric} ")


@pytest.mark.parametrize(("key", "limit"), [(k, v) for lvl, k, v in VERDICT_RULES if lvl == "high"])
def test_default_policy_fails_exactly_the_high_verdicts_at_their_boundary(key, limit):
    for value in (math.nextafter(limit, -1), limit, math.nextafter(limit, 2)):
        summary = leakage(**{key: value})
        high = summary.verdict.level == "high"
        assert judge(summary, Thresholds()).verdict == ("fail" if high else "pass"), value
    assert leakage(**{key: limit}).verdict.level != "high"


def test_insufficient_audit_fails_the_most_lenient_policy():
    lenient = Thresholds(**{f"max_{m}": 1.0 for m in METRICS})
    summary = leakage()
    summary.verdict = {"level": "insufficient", "text": "Too few scored rows"}
    judgement = judge(summary, lenient)
    assert judgement.verdict == "fail"
    assert judgement.breaches == ["insufficient: Too few scored rows"]


def sidecar(tmp_path, options: dict) -> str:
    path = tmp_path / "ezmia.yaml"
    path.write_text(yaml.safe_dump(options))
    return str(path)


@pytest.mark.parametrize(
    "key", [*OPERATOR_ONLY, "trust_remote_code+allow_pickle"], ids=lambda k: k.replace(".", "-")
)
def test_sidecar_may_not_set_operator_only_keys(tmp_path, key):
    options: dict = {"members": "m.parquet", "nonmembers": "n.parquet", "max_length": 32}
    for one in key.split("+"):
        group, _, name = one.rpartition(".")
        (options.setdefault(group, {}) if group else options)[name] = False
    with pytest.raises(InputError) as raised:
        read_options(sidecar(tmp_path, options))
    message = str(raised.value)
    assert f"{key.replace('+', ', ')}: a checkpoint's sidecar may not set" in message
    assert "only the operator's policy (audit_defaults or rules) or the scan's flags" in message


def test_sidecar_of_ordinary_options_is_read(tmp_path):
    options = read_options(sidecar(tmp_path, {"members": "./m.parquet", "nonmembers": "n.parquet",
                                              "ray": {"rows_per_block": 8}}))  # fmt: skip
    assert options["members"] == [str((tmp_path / "m.parquet").resolve())]
    assert options["ray"] == {"rows_per_block": 8}


def test_a_summary_of_an_older_ezmia_is_judged_again_by_todays_policy():
    """A nightly scan re-judges unchanged checkpoints from their stored summary.json; those
    written before operating points were recorded lack ``n_nonmembers`` and bounds."""
    old = json.loads((Path(__file__).parents[1] / "summary_json" / "leakage.json").read_text())
    for figures in old["metrics"].values():
        for key in ("n_nonmembers", "operating_points", "unresolved"):
            del figures[key]
        figures |= {"auc": 0.7, "tpr_at_1pct_fpr": 0.02, "tpr_at_0_1pct_fpr": 0.004}
    summary = Summary.model_validate(old)
    ez = summary.metrics["ez_score"]
    assert ez.n_nonmembers == old["metrics"]["ez_score"]["n"] - ez.n_members
    assert judge(summary, Thresholds(max_auc=0.7)).verdict == "pass"
    assert judge(summary, Thresholds(max_auc=0.69)).breaches[0] == "EZ auc 0.7000 > max_auc 0.69"
