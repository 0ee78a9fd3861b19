"""What users read, word for word: every verdict sentence, the insufficient and detection
verdicts, warnings, the privacy text, skipped scores, and the policy's breaches, overrides,
rule merging and path resolution. Fast unit tests on hand-built metrics."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from ezmia.errors import InputError
from ezmia.fleet.policy import (
    Policy,
    Thresholds,
    judge,
    load_policy,
    operator_only_keys,
    read_options,
    resolve_paths,
)
from ezmia.report.model import BlindBaseline, Detection, PrivacyBound, ScoreMetrics, SummaryData
from ezmia.report.summary import (
    build_summary,
    detection_verdict,
    insufficient,
    leakage_metrics,
    lowest_resolved,
    privacy_bound,
    privacy_text,
    scored_counts,
    status_counts,
    strongest,
    verdict,
    warnings,
)
from ezmia.stats.epsilon import audit_epsilon
from ezmia.stats.metrics import labelled_metrics
from ezmia.stats.scores import EZ_OK, EZ_STATUSES, SCORE_COLUMNS
from tests.factories import data, metrics


def point(tpr: float, low: float, high: float) -> dict:
    return {"tpr": tpr, "tpr_exact_ci95": [low, high]}


def score(auc: float, n: int = 1000, *, tpr1: float = 0.0, tpr01: float = 0.0, low: float = 0.0):
    """A score's metrics; 1000 non-members resolve both rates, 150 only 1%, 50 neither."""
    points = {}
    if n >= 100:
        points["tpr_at_1pct_fpr"] = point(tpr1, low, 0.5)
    if n >= 1000:
        points["tpr_at_0_1pct_fpr"] = point(tpr01, low, 0.25)
    return {
        "auc": auc,
        "tpr_at_1pct_fpr": tpr1 if n >= 100 else None,
        "tpr_at_0_1pct_fpr": tpr01 if n >= 1000 else None,
        "n_nonmembers": n,
        "operating_points": points,
    }


def typed(figures: dict[str, dict]) -> dict[str, ScoreMetrics]:
    return {name: metrics(m) for name, m in figures.items()}


# --- verdict -----------------------------------------------------------------------------


def test_no_ez_metrics_cannot_be_judged():
    assert verdict(typed({"loss": score(0.9)})).dump() == {
        "level": "unknown",
        "text": "No labelled EZ metrics: leakage cannot be judged.",
    }


@pytest.mark.parametrize(
    ("figures", "level", "advice"),
    [
        (score(0.5, tpr01=0.06, low=0.01), "high",
         "The checkpoint leaks its training data: do not release it as is."),
        (score(0.5, tpr1=0.06, low=0.01), "moderate",
         "The checkpoint leaks measurably: review before release."),
        (score(0.5, low=0.01), "low", "Little measurable leakage with these attacks and data."),
    ],
)  # fmt: skip
def test_verdict_of_ez_alone_at_the_lowest_resolved_rate(figures, level, advice):
    tpr = f"{figures['operating_points']['tpr_at_0_1pct_fpr']['tpr']:.1%}"
    assert verdict(typed({"ez_score": figures})).dump() == {
        "level": level,
        "text": f"{advice} At 0.1% false positives (the lowest rate 1000 non-members resolve) "
        f"the strongest attack, EZ-MIA, identifies {tpr} of the training records (exact 95% "
        "interval 1.0%-25.0%; AUC 0.500).",
        "score": "ez_score",
        "fpr": 0.001,
    }


def test_verdict_names_a_stronger_attack_and_keeps_ez_figures():
    scores = typed({"ez_score": score(0.55, 150, tpr1=0.02), "loss": score(0.8, 150, tpr1=0.3,
                                                                             low=0.2)})  # fmt: skip
    assert verdict(scores).dump() == {
        "level": "high",
        "text": "The checkpoint leaks its training data: do not release it as is. At 1.0% false "
        "positives (the lowest rate 150 non-members resolve) the strongest attack, LOSS, "
        "identifies 30.0% of the training records (exact 95% interval 20.0%-50.0%; AUC "
        "0.800). EZ: 2.0%, AUC 0.550.",
        "score": "loss",
        "fpr": 0.01,
    }


def test_verdict_without_a_resolved_rate_judges_by_auc():
    ez = {**score(0.65, 50), "operating_points": {}}
    assert verdict(typed({"ez_score": ez})).dump() == {
        "level": "moderate",
        "text": "The checkpoint leaks measurably: review before release. 50 non-members "
        "resolve none of the reported false-positive rates (1.0% needs 100, 0.1% needs "
        "1000): the strongest attack, EZ-MIA, reaches AUC 0.650.",
        "score": "ez_score",
        "fpr": None,
    }
    found = verdict(typed({"ez_score": ez, "zlib": {**score(0.9, 50), "operating_points": {}}}))
    assert found.score == "zlib" and found.level == "high"
    assert found.text.endswith("the strongest attack, zlib, reaches AUC 0.900 (EZ 0.650).")


def test_lowest_resolved_rate():
    assert lowest_resolved(typed({"ez_score": score(0.5, 1000)})) == "tpr_at_0_1pct_fpr"
    assert lowest_resolved(typed({"ez_score": score(0.5, 150)})) == "tpr_at_1pct_fpr"
    assert lowest_resolved(typed({"ez_score": score(0.5, 50)})) is None


def test_strongest_by_level_then_interval_low_end_then_auc():
    # level first: a moderate AUC beats a higher interval low end at a low level
    scores = typed({"ez_score": score(0.61, low=0.0), "loss": score(0.55, low=0.04)})
    assert strongest(scores) == ("ez_score", "tpr_at_0_1pct_fpr")
    # same level: the higher lower end of the exact interval, whatever the AUC
    scores = typed({"ez_score": score(0.59, low=0.03), "loss": score(0.55, low=0.04)})
    assert strongest(scores) == ("loss", "tpr_at_0_1pct_fpr")
    # same level and interval: the AUC
    scores = typed({"ez_score": score(0.52, low=0.03), "loss": score(0.55, low=0.03)})
    assert strongest(scores) == ("loss", "tpr_at_0_1pct_fpr")
    # nothing resolved: the AUC
    scores = typed({"ez_score": score(0.55, 50), "loss": score(0.52, 50)})
    assert strongest(scores) == ("ez_score", None)


# --- counts and insufficient ---------------------------------------------------------------


def test_insufficient_names_every_unscored_status_and_the_fix():
    counts = dict.fromkeys(EZ_STATUSES, 0) | {EZ_OK: 5, "too_short": 3, "empty": 2}
    assert insufficient(19, 40, counts).dump() == {
        "level": "insufficient",
        "text": "Too few scored rows for a verdict: 19 members and 40 non-members were scored "
        "(ez_status ok); a verdict needs at least 20 of each. Not scored: 2 empty, 3 "
        "too_short. Add rows, or raise --max-length when rows are too_few_errors or too_short.",
    }
    assert "Not scored: none. Add rows" in insufficient(20, 0, {EZ_OK: 20}).text
    assert insufficient(20, 20, {}) is None


def table(members: list, statuses: list, values: dict | None = None) -> pa.Table:
    n = len(members)
    columns = {c: pa.array((values or {}).get(c, [0.5] * n), pa.float64()) for c in SCORE_COLUMNS}
    return pa.table({**columns, "ez_status": statuses, "is_member": pa.array(members, pa.bool_())})


def test_status_counts_list_every_status_and_scored_counts_split_by_label():
    scores = table([True, True, False, False, None], ["ok", "empty", "ok", "ok", "ok"])
    assert status_counts(scores) == dict.fromkeys(EZ_STATUSES, 0) | {"ok": 4, "empty": 1}
    assert scored_counts(scores) == (1, 3)  # a missing label counts as a non-member
    assert scored_counts(table([True], ["empty"])) == (0, 0)


def test_skipped_scores_say_why():
    nan = [float("nan")] * 4
    scores = table(
        [True, False, True, False],
        ["ok"] * 4,
        {"loss": nan, "min_k_pp": nan, "zlib": [1.0, float("nan"), 2.0, float("nan")]},
    )
    found, skipped = leakage_metrics(scores, 0, 0)
    assert skipped == {
        "loss": "no finite values",
        "min_k_pp": "no finite values (it needs the full next-token distribution, which the "
        "backend does not provide)",
        "zlib": "needs both members and non-members among scored rows",
    }
    assert set(found) == {"ez_score", "ref_ratio", "min_k"}
    assert found["ez_score"].n == 4 and found["ez_score"].auc == 0.5


def test_metrics_and_bound_use_the_given_rounds_and_seed():
    rng = np.random.default_rng(4)
    members = np.r_[np.ones(150, bool), np.zeros(150, bool)]
    values = members * 0.3 + rng.random(300)
    scores = table(members.tolist(), ["ok"] * 300, {"ez_score": values})
    ez = leakage_metrics(scores, 40, 5)[0]["ez_score"]
    assert ez.dump() == labelled_metrics(members, values, 40, 5)
    assert ez.auc_ci95 != labelled_metrics(members, values, 40, 6)["auc_ci95"]
    found = build_summary(scores, mode="leakage", bootstrap_rounds=40, seed=5, detection=None)
    assert found.metrics["ez_score"] == ez
    assert found.privacy == privacy_bound(scores, list(found.metrics), 1e-5, None, 5)
    assert found.privacy != privacy_bound(scores, list(found.metrics), 1e-5, None, 6)


# --- warnings, privacy, detection ----------------------------------------------------------


def blind_summary(blind: dict | None, attack_auc: float = 0.8) -> SummaryData:
    blind = blind and BlindBaseline(**{"n": 400, **blind})
    verdict = {"level": "low", "text": "", "score": "ez_score"}
    return data(metrics={"ez_score": score(attack_auc)}, verdict=verdict, blind_baseline=blind)


def test_blind_baseline_warning_word_for_word():
    blind = {"distinguishable": True, "auc": 0.65, "auc_ci95": [0.6, 0.7], "limit": 0.58}
    assert warnings(blind_summary(blind)) == [
        "The member and non-member texts are told apart without the model (blind text "
        "classifier AUC 0.65, 95% interval 0.60-0.70, above 0.58): the split itself differs "
        "(source, date, style), so every leakage figure here is inflated by it. The blind "
        "classifier already has 50% of the strongest attack's advantage over chance (AUC "
        "0.80). Draw members and non-members from the same distribution."
    ]


def test_blind_baseline_warning_share_is_capped_and_interval_optional():
    blind = {"distinguishable": True, "auc": 0.7, "auc_ci95": None, "limit": 0.58}
    (capped,) = warnings(blind_summary(blind, attack_auc=0.6))
    assert "AUC 0.70, 95% interval 0.70-0.70, above 0.58" in capped
    assert "already has 100% of the strongest attack's advantage over chance (AUC 0.60)" in capped
    (chance,) = warnings(blind_summary(blind, attack_auc=0.5))
    assert "already has 100% of the strongest attack's advantage over chance (AUC 0.50)" in chance
    assert warnings(blind_summary({**blind, "distinguishable": False})) == []
    assert warnings(blind_summary(None)) == []


def test_privacy_text_with_and_without_a_claim():
    figures = {"score": "ref_ratio", "epsilon_lower_bound": 1.234, "delta": 1e-5,
               "confidence": 0.95, "threshold": 0.5, "tp": 1, "n_members": 2, "fp": 0,
               "n_nonmembers": 2}  # fmt: skip
    assert privacy_text(PrivacyBound(**figures)) == (
        "Empirical privacy: the Reference ratio attack refutes any epsilon below 1.23 at delta "
        "1e-05 with 95% confidence, assuming members were chosen at random."
    )
    claimed = PrivacyBound(**figures, claimed_epsilon=8.0, claim="not refuted")
    assert privacy_text(claimed).endswith(
        "assuming members were chosen at random. The claimed epsilon 8 is not refuted."
    )


def test_the_bound_uses_the_given_delta_and_seed():
    rng = np.random.default_rng(2)
    members = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    values = members + rng.random(600)
    scores = table(members.tolist(), ["ok"] * 600, {"ez_score": values})
    for delta, seed in ((1e-3, 0), (1e-5, 7)):
        expected = audit_epsilon(members, {"ez_score": values}, delta=delta, seed=seed)
        assert privacy_bound(scores, ["ez_score"], delta, None, seed).dump() == expected
    assert audit_epsilon(members, {"ez_score": values}, seed=7) != audit_epsilon(
        members, {"ez_score": values}, seed=0
    )


def test_a_missing_label_counts_as_a_non_member_in_metrics_and_bound():
    rng = np.random.default_rng(3)
    members = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    values = {"ez_score": members + rng.random(600)}
    labels = [True] * 300 + [None] * 300
    scores = table(labels, ["ok"] * 600, values)
    assert scored_counts(scores) == (300, 300)
    ez = leakage_metrics(scores, 0, 0)[0]["ez_score"]
    assert ez.n_nonmembers == 300 and ez.auc == 1.0
    bound = privacy_bound(scores, ["ez_score"], 1e-5, None, 0)
    assert bound.dump() == audit_epsilon(members, values, delta=1e-5, seed=0)


def test_a_claim_equal_to_the_bound_is_not_refuted():
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = table(members.tolist(), ["ok"] * 600, {"ez_score": members + rng.random(600)})
    bound = privacy_bound(scores, ["ez_score"], 1e-5, None, 0)
    assert "claim" not in bound.dump() and "claimed_epsilon" not in bound.dump()
    at = privacy_bound(scores, ["ez_score"], 1e-5, bound.epsilon_lower_bound, 0)
    assert (at.claim, at.claimed_epsilon) == ("not refuted", bound.epsilon_lower_bound)
    below = np.nextafter(bound.epsilon_lower_bound, 0)
    assert privacy_bound(scores, ["ez_score"], 1e-5, below, 0).claim == "refuted"


DETECTION = {"fpr": 0.01, "threshold": 1.0, "n_calibration": 1000}


def test_detection_verdict_word_for_word_at_the_chance_boundary():
    """Chance flags up to 3 of 100 at 1% (the binomial 97.5% quantile): 3 is no evidence."""
    found = Detection(**DETECTION, n_flagged=3, n_candidates=100)
    assert detection_verdict(found).dump() == {
        "level": "no evidence",
        "text": "3 of 100 candidates score above the EZ threshold that 1.00% of 1000 known "
        "non-members exceed: no more than the 3 chance alone would flag; no evidence that the "
        "candidates include training records.",
    }
    found.n_flagged = 4
    assert detection_verdict(found).dump() == {
        "level": "members likely",
        "text": "4 of 100 candidates score above the EZ threshold that 1.00% of 1000 known "
        "non-members exceed: more than the 3 chance alone would flag, so the candidates likely "
        "include training records.",
    }


def test_build_summary_in_detection_and_scores_only_modes():
    scores = table([None] * 4, ["ok", "ok", "ok", "empty"]).append_column(
        "flagged", pa.array([True, False, True, False])
    )
    found = build_summary(scores, mode="detection", bootstrap_rounds=0, seed=0, detection=DETECTION)
    assert found.mode == "detection" and found.n_rows == 4
    assert found.status_counts == dict.fromkeys(EZ_STATUSES, 0) | {"ok": 3, "empty": 1}
    assert found.detection.dump() == {**DETECTION, "n_flagged": 2, "n_candidates": 4}
    assert found.verdict == detection_verdict(Detection(**DETECTION, n_flagged=2, n_candidates=4))
    none = scores.set_column(scores.num_columns - 1, "flagged", pa.array([False] * 4))
    found = build_summary(none, mode="detection", bootstrap_rounds=0, seed=0, detection=DETECTION)
    assert found.detection.n_flagged == 0
    assert found.verdict.text.startswith("0 of 4 candidates score above")
    unknown = {"level": "unknown", "text": "Scores only: no labels to judge by."}
    for mode, detection in (("scores", None), ("detection", None)):
        only = build_summary(scores, mode=mode, bootstrap_rounds=0, seed=0, detection=detection)
        written = only.dump()
        assert written["verdict"] == unknown and "metrics" not in written
        assert "detection" not in written


def test_build_summary_of_a_leakage_audit_carries_privacy_and_warnings():
    rng = np.random.default_rng(1)
    members = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = table(members.tolist(), ["ok"] * 600, {"ez_score": members + rng.random(600)})
    found = build_summary(scores, mode="leakage", bootstrap_rounds=0, seed=0, detection=None)
    assert found.blind_baseline is None and found.verdict.warnings == []
    assert found.metrics_skipped == {}
    assert found.verdict.privacy == privacy_text(found.privacy)
    assert found.privacy.score in found.metrics and "claim" not in found.privacy.dump()
    few = build_summary(table([True, False], ["ok", "ok"]), mode="leakage", bootstrap_rounds=0,
                        seed=0, detection=None)  # fmt: skip
    assert few.verdict.level == "insufficient" and "privacy" not in few.dump()


# --- policy ---------------------------------------------------------------------------------


def leaky(**scores: dict) -> SummaryData:
    figures = typed({"ez_score": score(0.5), **scores})
    return data(metrics=figures, verdict=verdict(figures))


def test_default_thresholds_are_the_high_verdict_limits_on_ez():
    assert Thresholds().model_dump() == {
        "score": "ez_score",
        "max_tpr_at_0_1pct_fpr": 0.05,
        "max_tpr_at_1pct_fpr": None,
        "max_auc": 0.75,
    }


def test_judge_without_ez_metrics_names_the_mode():
    assert judge(data(mode="scores"), Thresholds()).breaches == [
        "no EZ leakage metrics (mode scores): the policy needs members and nonmembers"
    ]
    assert judge(data(mode="leakage"), Thresholds()).breaches == [
        "no EZ leakage metrics (mode leakage): the policy needs members and nonmembers"
    ]


def test_judge_of_a_score_not_measured_says_why():
    summary = leaky()
    summary.metrics_skipped = {"min_k_pp": "no finite values"}
    judged = judge(summary, Thresholds(score="min_k_pp"))
    assert (judged.verdict, judged.breaches) == (
        "fail",
        ["score 'min_k_pp' was not measured (no finite values)"],
    )
    assert judge(leaky(), Thresholds(score="lss")).breaches == [
        "score 'lss' was not measured (not a score)"
    ]


def test_judge_of_one_named_score_ignores_the_others():
    summary = leaky(loss=score(0.9, tpr01=0.5))
    assert judge(summary, Thresholds()).verdict == "pass"
    judged = judge(summary, Thresholds(score="loss"))
    assert judged.breaches == [
        "loss auc 0.9000 > max_auc 0.75",
        "loss tpr_at_0_1pct_fpr 0.5000 > max_tpr_at_0_1pct_fpr 0.05",
    ]


def test_judge_of_any_score_lists_every_breach_by_score():
    summary = leaky(ez_score=score(0.8), loss=score(0.5), zlib=score(0.76, tpr1=0.3))
    judged = judge(summary, Thresholds(score="any", max_tpr_at_1pct_fpr=0.25))
    assert (judged.verdict, judged.breaches) == (
        "fail",
        [
            "EZ auc 0.8000 > max_auc 0.75",
            "zlib auc 0.7600 > max_auc 0.75",
            "zlib tpr_at_1pct_fpr 0.3000 > max_tpr_at_1pct_fpr 0.25",
        ],
    )
    assert judge(leaky(loss=score(0.6)), Thresholds(score="any")).verdict == "pass"


def test_judge_of_an_unresolved_rate_by_its_bound():
    unresolved = {"fpr": 0.001, "needs_nonmembers": 1000, "upper_bound": 0.12,
                  "upper_bound_at_fpr": 1 / 150}  # fmt: skip
    ez = {**score(0.6, 150), "unresolved": {"tpr_at_0_1pct_fpr": unresolved}}
    judged = judge(leaky(ez_score=ez), Thresholds())
    assert (judged.verdict, judged.breaches) == (
        "fail",
        [
            "EZ tpr_at_0_1pct_fpr cannot be measured with 150 non-members (needs 1000) and its "
            "bound, the TPR at FPR 0.67%, is 0.1200 > max_tpr_at_0_1pct_fpr 0.05: add "
            "non-members or lift the limit"
        ],
    )
    low = {**ez, "unresolved": {"tpr_at_0_1pct_fpr": {**unresolved, "upper_bound": 0.05}}}
    assert judge(leaky(ez_score=low), Thresholds()).verdict == "pass"


def test_override_of_the_score_and_unset_keys_keep_the_global_values():
    policy = Policy(
        thresholds=Thresholds(max_auc=0.6, max_tpr_at_1pct_fpr=0.2),
        overrides=[{"match": "team-a/*", "score": "any"}, {"match": "*/ckpt-7", "max_auc": 0.9}],
    )
    assert policy.thresholds_for("team-b/ckpt-1") == policy.thresholds
    assert policy.thresholds_for("team-a/ckpt-1").model_dump() == {
        "score": "any",
        "max_tpr_at_0_1pct_fpr": 0.05,
        "max_tpr_at_1pct_fpr": 0.2,
        "max_auc": 0.6,
    }
    assert policy.thresholds_for("team-a/ckpt-7").model_dump() == {
        "score": "any",
        "max_tpr_at_0_1pct_fpr": 0.05,
        "max_tpr_at_1pct_fpr": 0.2,
        "max_auc": 0.9,
    }
    assert policy.thresholds_for("Team-A/ckpt-1").score == "ez_score"  # globs are case-sensitive


def test_rule_options_merge_every_matching_rule_in_order():
    policy = Policy(
        rules=[
            {"match": "team-a/*", "members": "a.parquet", "max_length": 64},
            {"match": "*/ckpt-7", "max_length": 128, "nonmembers": ["n.parquet"]},
            {"match": "team-b/*", "members": "b.parquet"},
        ]
    )
    assert policy.rule_options("team-a/ckpt-7") == {
        "members": ["a.parquet"],
        "max_length": 128,
        "nonmembers": ["n.parquet"],
    }
    assert policy.rule_options("team-a/ckpt-1") == {"members": ["a.parquet"], "max_length": 64}
    assert policy.rule_options("team-c/ckpt-1") is None
    assert Policy().rule_options("team-a/ckpt-1") is None


def test_load_policy_resolves_relative_paths_against_its_folder(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "policy.yaml"
    path.write_text(
        "audit_defaults: {reference: ../models/base, max_length: 32}\n"
        "rules:\n"
        "  - {match: 'a/*', members: ./m.parquet, nonmembers: [../n.parquet, /abs/n.parquet]}\n"
        "lock_ttl_hours: 2\n"
    )
    policy = load_policy(str(path))
    assert policy.audit_defaults.model_dump(exclude_unset=True) == {
        "reference": str(tmp_path / "models" / "base"),
        "max_length": 32,
    }
    assert policy.rule_options("a/x") == {
        "members": [str(tmp_path / "conf" / "m.parquet")],
        "nonmembers": [str(tmp_path / "n.parquet"), "/abs/n.parquet"],
    }
    assert policy.lock_ttl_hours == 2
    assert load_policy(None) == Policy()


def test_load_policy_from_a_bare_file_name_is_relative_to_the_working_folder(tmp_path):
    (tmp_path / "policy.yaml").write_text("rules: [{match: '*', members: ./m.parquet}]\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        policy = load_policy("policy.yaml")
    finally:
        os.chdir(cwd)
    assert policy.rule_options("x") == {"members": [str(tmp_path / "m.parquet")]}


def test_load_policy_refuses_a_bad_rule_naming_the_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rules: [not-a-mapping]\n")
    with pytest.raises(InputError) as raised:
        load_policy(str(path))
    assert str(raised.value).startswith(f"{path}: rules.0")


def test_resolve_paths_against_a_bucket_folder_and_leaves_other_values_alone():
    """(No "s3" in this test's name: ``make mutate`` deselects those.)"""
    options = {"members": ["./m.parquet", "s3://b/x.parquet", 3], "reference": "../ref",
               "data": "plain.parquet", "max_length": "./not-a-path"}  # fmt: skip
    assert resolve_paths(options, "s3://bucket/team/ckpt") == {
        "members": ["s3://bucket/team/ckpt/m.parquet", "s3://b/x.parquet", 3],
        "reference": "s3://bucket/team/ref",
        "data": "plain.parquet",
        "max_length": "./not-a-path",
    }
    assert options["members"][0] == "./m.parquet"  # the input is not changed


def test_operator_only_keys_found_at_top_level_and_in_groups():
    assert operator_only_keys({"engine": "ray", "ray": {"address": "x"}, "sse": None}) == [
        "sse",
        "engine",
        "ray.address",
    ]
    assert operator_only_keys({"ray": "not-a-group", "address": "x", "max_length": 8}) == []


def test_sidecar_refusal_word_for_word(tmp_path):
    path = tmp_path / "ezmia.yaml"
    path.write_text("allow_pickle: true\n")
    with pytest.raises(InputError) as raised:
        read_options(str(path))
    assert str(raised.value) == (
        f"{path}: allow_pickle: a checkpoint's sidecar may not set it, only the operator's "
        "policy (audit_defaults or rules) or the scan's flags may; remove it from the sidecar"
    )
    path.write_text("allow_pickle: true\ncache_dir: /tmp\n")
    with pytest.raises(InputError) as raised:
        read_options(str(path))
    assert str(raised.value) == (
        f"{path}: allow_pickle, cache_dir: a checkpoint's sidecar may not set them, only the "
        "operator's policy (audit_defaults or rules) or the scan's flags may; remove them from "
        "the sidecar"
    )


def test_sidecar_with_a_bad_key_names_the_sidecar(tmp_path):
    path = tmp_path / "ezmia.yaml"
    path.write_text("members: m.parquet\nmax_lenght: 8\n")
    with pytest.raises(InputError) as raised:
        read_options(str(path))
    assert str(raised.value).startswith(f"{path}: max_lenght")
