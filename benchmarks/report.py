"""Turning raw path timings into the benchmark's figures, its goals and its tables."""

from __future__ import annotations

import math

from benchmarks.measure import MFU_PEAK

# Goals of the performance issue, checked on the GPT-2-small cases (CPU) or every case (GPU).
CPU_GOALS = {
    "mfu": 0.70,
    "speedup": 1.5,
    "memory_ratio": 0.5,
    "score_diff": 1e-5,
    "fp64_error_ratio": 1.0,
}
GPU_GOALS = {"mfu": 0.50, "speedup": 10.0}
UPPER_BOUNDS = ("memory_ratio", "score_diff", "fp64_error_ratio")


def case_figures(run: dict, peaks: dict, flop_params: int, tokens: int) -> dict:
    """Throughput, MFU and memory of one path's run (``tokens``: real tokens scored). MFU is
    against the matmul peak measured beside the run; ``mfu_run_peak`` against the run-wide
    ``peaks``."""
    flops = 2 * 2 * flop_params * tokens
    core = peaks.get("float32_core")
    return {
        "model": run["model"],
        "target": run["kind"],
        "path": run["path"],
        "sequences": len(run["ez_score"]),
        "tokens": tokens,
        "seconds": run["seconds"],
        "seq_per_s": len(run["ez_score"]) / run["seconds"],
        "tok_per_s": tokens / run["seconds"],
        "mfu": flops / run["seconds"] / run["adjacent_peak"],
        "mfu_run_peak": flops / run["seconds"] / peaks[MFU_PEAK[run["device"].split(":")[0]]],
        "mfu_cpu": flops / run["cpu_s"] / core if core else float("nan"),
        "delta_mb": run["delta_mb"],
        "peak_mb": run["peak_mb"],
        "load_s": run["load_s"],
    }


def _max_diff(a: list[float], b: list[float], relative: bool = False) -> float:
    """Largest difference over the common prefix; relative to ``max(1, |b|)`` if asked."""
    pairs = zip(a, b, strict=False)
    diffs = [abs(x - y) / (max(1.0, abs(y)) if relative else 1.0) for x, y in pairs]
    return max(diffs, default=float("nan"))


def comparison(runs: dict, fast_case: dict, base_case: dict) -> dict:
    """ezmia against the baseline on the same model, target and texts; with an ``oracle``
    run, both paths' largest score error on its (first few) texts."""
    fast, base = runs["ezmia"], runs["baseline"]
    oracle = runs.get("oracle", {}).get("ez_score", [])
    return {
        "model": fast["model"],
        "target": fast["kind"],
        "speedup": base_case["seconds"] / fast_case["seconds"],
        "memory_ratio": fast_case["delta_mb"] / max(base_case["delta_mb"], 1e-9),
        "peak_ratio": fast_case["peak_mb"] / base_case["peak_mb"],
        "max_abs_score_diff": _max_diff(fast["ez_score"], base["ez_score"]),
        "max_rel_score_diff": _max_diff(fast["ez_score"], base["ez_score"], relative=True),
        "oracle_sequences": len(oracle),
        "ezmia_vs_fp64": _max_diff(fast["ez_score"], oracle, relative=True),
        "baseline_vs_fp64": _max_diff(base["ez_score"], oracle, relative=True),
        "fp64_error_ratio": _max_diff(fast["ez_score"], oracle, relative=True)
        / max(_max_diff(base["ez_score"], oracle, relative=True), 1e-300),
        "not_ok": sum(status != "ok" for status in fast["ez_status"]),
        "mfu": fast_case["mfu"],
    }


def goal_checks(comparisons: list[dict], device: str) -> list[dict]:
    """Each goal of the issue against each comparison it applies to."""
    goals = GPU_GOALS if device == "cuda" else CPU_GOALS
    checks = []
    for c in comparisons:
        if device != "cuda" and c["model"] != "gpt2-small":
            continue
        for name, bound in goals.items():
            value = c["max_rel_score_diff"] if name == "score_diff" else c[name]
            if math.isnan(value):
                continue
            met = value <= bound if name in UPPER_BOUNDS else value >= bound
            checks.append({"case": f"{c['model']} {c['target']}", "goal": name,
                           "bound": bound, "value": value, "met": met})  # fmt: skip
    return checks


def _fmt(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:,.{digits}f}"


CASE_COLUMNS = (
    ("model", "model", str),
    ("target", "target", str),
    ("path", "path", str),
    ("seq/s", "seq_per_s", lambda v: _fmt(v, 2)),
    ("tok/s", "tok_per_s", lambda v: _fmt(v, 0)),
    ("MFU", "mfu", lambda v: f"{100 * v:.1f}%"),
    ("MFU (CPU time)", "mfu_cpu", lambda v: "-" if math.isnan(v) else f"{100 * v:.1f}%"),
    ("scoring mem MB", "delta_mb", lambda v: _fmt(v, 0)),
    ("peak mem MB", "peak_mb", lambda v: _fmt(v, 0)),
    ("load s", "load_s", lambda v: _fmt(v, 1)),
)

RATIO_COLUMNS = (
    ("model", "model", str),
    ("target", "target", str),
    ("throughput x", "speedup", lambda v: f"{v:.2f}x"),
    ("scoring mem", "memory_ratio", lambda v: f"{v:.3f}x"),
    ("peak mem", "peak_ratio", lambda v: f"{v:.2f}x"),
    ("max |d score|", "max_abs_score_diff", lambda v: f"{v:.1e}"),
    ("max rel d", "max_rel_score_diff", lambda v: f"{v:.1e}"),
    ("ezmia vs fp64", "ezmia_vs_fp64", lambda v: f"{v:.1e}"),
    ("baseline vs fp64", "baseline_vs_fp64", lambda v: f"{v:.1e}"),
    ("EZ edge cases", "not_ok", str),
)


def table(rows: list[dict], columns: tuple) -> str:
    """A Markdown table (also readable on a console)."""
    head = [title for title, _, _ in columns]
    body = [[fmt(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [head, ["-" * w for w in widths], *body]
    return "\n".join(
        "| " + " | ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    )


def _peaks_line(peaks: dict) -> str:
    names = {"float32": "fp32", "float32_core": "fp32 on one core", "bfloat16": "bf16"}
    return ", ".join(f"{names[k]} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items())


def _goals_lines(goals: list[dict]) -> str:
    return "\n".join(
        f"- {'met' if g['met'] else 'NOT met'}: {g['case']} {g['goal']} = {g['value']:.5g} "
        f"(goal {'<=' if g['goal'] in UPPER_BOUNDS else '>='} {g['bound']})"
        for g in goals
    )


def disturbed_peak_warning(cases: list[dict]) -> str:
    """A warning when some MFU exceeds 100%: the peak was then measured on busy cores."""
    if all(case["mfu"] <= 1.0 for case in cases):
        return ""
    return (
        "\n**Warning**: an MFU above 100% means both matmul-peak measurements ran while other"
        " processes held the cores; the MFU figures of this run are not valid. Rerun on an idle"
        " machine.\n"
    )


def markdown(results: dict) -> str:
    """``RESULTS.md``: date, hardware, peaks, per-path table, ratios last, goals."""
    hw = results["hardware"]
    gpu = f", {hw['gpu']}" if "gpu" in hw else ""
    load = ", ".join(f"{x:.1f}" for x in hw["load_average"])
    end = ", ".join(f"{x:.1f}" for x in hw.get("load_average_end", []))
    seqs = ", ".join(f"{model} {n}" for model, n in results["sequences"].items())
    return f"""# Benchmark results

Date: {results["date"]}. Hardware: {hw["cpu"]} ({hw["cpu_count"]} CPUs, {hw["threads"]} torch
threads){gpu}; torch {hw["torch"]}, Python {hw["python"]}; load average (1, 5, 15 min) at
start {load}, at end {end or "-"}; dtype {results["dtype"]}. Sequences: {seqs};
the paths alternate, each timed {results["repeats"]} times, fastest kept.

Matmul peaks measured in this run (best of before and after all paths):
{_peaks_line(results["peaks"])}. MFU is against the {results["mfu_peak"]} peak measured in
the same process right before and after each timed run, so a slow spell of a shared machine
lowers both (`mfu_run_peak` in `results.json` is against the run-wide peak); MFU (CPU time)
against one core's peak per CPU-second. Model
FLOPs = 2 passes x 2 x N x real tokens (N = body parameters without embeddings + LM head).
Texts: Python stdlib docstrings, truncated to {results["max_length"]} tokens. Scoring memory
is the peak above the memory held once models are loaded; peak memory includes the models.

{table(results["cases"], CASE_COLUMNS)}
{disturbed_peak_warning(results["cases"])}
ezmia / baseline (throughput: higher is better; memory: lower is better; score differences
against the baseline and, on the first texts, against the same scores computed in float64;
all but `max |d score|` relative to max(1, |score|)):

{table(results["comparisons"], RATIO_COLUMNS)}

Goals (`score_diff`: largest EZ score difference against the fp32 baseline, relative to
max(1, |score|); `fp64_error_ratio`: ezmia's largest error against the float64 oracle over the
baseline's, below 1 when ezmia is the more accurate of the two):

{_goals_lines(results["goals"])}
"""
