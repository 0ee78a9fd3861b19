"""The benchmark's figures: score differences relative to max(1, |score|), goal checks on the
GPT-2-small cases only, and the warning that voids MFU figures above 100%."""

from __future__ import annotations

import pytest

from benchmarks import report


def _case(mfu: float, seconds: float, delta_mb: float, model: str = "gpt2-small") -> dict:
    return {"model": model, "mfu": mfu, "seconds": seconds, "delta_mb": delta_mb, "peak_mb": 1e3}


def _runs(fast: list[float], base: list[float], oracle: list[float]) -> dict:
    meta = {"model": "gpt2-small", "kind": "full"}
    return {
        "ezmia": {**meta, "ez_score": fast, "ez_status": ["ok"] * len(fast)},
        "baseline": {**meta, "ez_score": base},
        "oracle": {**meta, "ez_score": oracle},
    }


def test_score_differences_are_relative_to_the_larger_of_one_and_the_score():
    runs = _runs(fast=[200.002, 0.5], base=[200.0, 0.500001], oracle=[200.001, 0.5])
    c = report.comparison(runs, _case(0.75, 10.0, 100.0), _case(0.4, 20.0, 1000.0))
    assert c["max_abs_score_diff"] == pytest.approx(0.002)
    assert c["max_rel_score_diff"] == pytest.approx(1e-5)
    assert c["ezmia_vs_fp64"] == pytest.approx(0.001 / 200.001)
    assert c["baseline_vs_fp64"] == pytest.approx(0.001 / 200.001)
    assert c["speedup"] == pytest.approx(2.0)
    assert c["memory_ratio"] == pytest.approx(0.1)


def test_goal_checks_flag_each_missed_goal_and_skip_other_models_on_cpu():
    runs = _runs(fast=[1.0], base=[1.00002], oracle=[1.000015])
    slow = report.comparison(runs, _case(0.65, 15.0, 600.0), _case(0.4, 20.0, 1000.0))
    demo = {**slow, "model": "demo"}
    checks = report.goal_checks([slow, demo], "cpu")
    assert {c["case"] for c in checks} == {"gpt2-small full"}
    missed = {c["goal"] for c in checks if not c["met"]}
    assert missed == {"mfu", "speedup", "memory_ratio", "score_diff", "fp64_error_ratio"}


def test_mfu_above_one_voids_the_run_with_a_warning():
    assert report.disturbed_peak_warning([_case(0.74, 1, 1), _case(0.42, 1, 1)]) == ""
    assert "not valid" in report.disturbed_peak_warning([_case(1.5, 1, 1)])


def test_mfu_is_against_the_peak_measured_beside_the_run():
    run = {"model": "m", "kind": "full", "path": "ezmia", "device": "cpu", "ez_score": [0.0],
           "seconds": 2.0, "cpu_s": 4.0, "adjacent_peak": 50.0, "delta_mb": 1.0,
           "peak_mb": 2.0, "load_s": 1.0}  # fmt: skip
    peaks = {"float32": 100.0, "float32_core": 25.0}
    figures = report.case_figures(run, peaks, flop_params=5, tokens=2)
    assert figures["mfu"] == pytest.approx(2 * 2 * 5 * 2 / 2.0 / 50.0)
    assert figures["mfu_run_peak"] == pytest.approx(2 * 2 * 5 * 2 / 2.0 / 100.0)
    assert figures["mfu_cpu"] == pytest.approx(2 * 2 * 5 * 2 / 4.0 / 25.0)
