"""Self-contained HTML audit report: one pure function from a run summary and its scores.

The page is the Jinja2 template ``templates/report.html.j2``, rendered with autoescaping on:
everything from data (ids, texts, names, config values) is escaped by the template, and
nothing here is marked safe. This module prepares plain values: formatted numbers, table
rows and chart coordinates; the template draws the charts as inline SVG. Styles are inline,
there is no JavaScript and no external resource, so the file renders offline.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ezmia.report.model import MetricsBase, Summary
from ezmia.stats.metrics import FPR_POINTS, METRICS, metric_label, point_metrics, roc
from ezmia.stats.scores import (
    EZ_EMPTY,
    EZ_NO_NEGATIVE_SHIFT,
    EZ_NON_FINITE,
    EZ_OK,
    EZ_STATUSES,
    EZ_TOO_FEW_ERRORS,
    EZ_TOO_SHORT,
    SCORES,
)

TOP_N = 20
TEXT_LIMIT = 300
FPR_MIN = 1e-4
HIST_BINS = 40
HIST_CLIP_PERCENTILE = 99.0
MISSING = "\u2014"  # an em dash where a number is missing

VERDICT_COLORS: dict[str, tuple[str, str]] = {
    "high": ("#b91c1c", "#fdecec"),
    "moderate": ("#b45309", "#fff4e0"),
    "low": ("#15803d", "#e9f7ee"),
    "insufficient": ("#6d28d9", "#f3effd"),
    "unknown": ("#4b5563", "#f1f2f4"),
    "members likely": ("#b91c1c", "#fdecec"),
    "no evidence": ("#15803d", "#e9f7ee"),
}

STATUS_NOTES: dict[str, str] = {
    EZ_OK: "EZ score computed normally.",
    EZ_TOO_FEW_ERRORS: (
        "Fewer than 2 error-zone positions: the target predicts almost every token as its "
        "top-1. Scored 0.0 as in the paper's code, yet near-perfect prediction can itself "
        "mean memorisation, so look at these rows."
    ),
    EZ_NO_NEGATIVE_SHIFT: (
        "Every error-zone shift is upward (the target beats the reference wherever it errs): "
        "the strongest member evidence. Scored 0.0 as in the paper's code, so look at these "
        "rows."
    ),
    EZ_EMPTY: "The text produced no tokens; scored 0.0.",
    EZ_TOO_SHORT: "Fewer than 3 tokens, so no position is left to score; scored 0.0.",
    EZ_NON_FINITE: "A log-prob shift in the error zone was NaN or infinite; scored 0.0.",
}
REVIEW_STATUSES = (EZ_NO_NEGATIVE_SHIFT, EZ_TOO_FEW_ERRORS)

SECRET_KEY = re.compile(
    r"(secret|password|passwd|credential|api_?key|access_?key|session_?token|auth_?token"
    r"|^token$|hf_token)",
    re.IGNORECASE,
)
ESSENTIAL_KEY = re.compile(
    r"(target|reference|data|member|candidate|calibration|max_length|fpr|name)",
    re.IGNORECASE,
)

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("ezmia.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# ---------------------------------------------------------------- numbers as text


def _is_num(value: Any) -> bool:
    """True for a finite real number (not a bool)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _fmt(value: Any, spec: str = ".3f") -> str:
    """A number in a format spec (".4g", ".1%"); an em dash when missing or not finite."""
    return format(float(value), spec) if _is_num(value) else MISSING


def _fmt_ci(ci: Any, pct: bool) -> str:
    """A ``[lo, hi]`` interval as ``[0.880, 0.920]`` (or percentages), empty when absent."""
    if not isinstance(ci, Sequence) or len(ci) != 2 or not all(_is_num(v) for v in ci):
        return ""
    lo, hi = (100 * float(v) if pct else float(v) for v in ci)
    digits = 1 if pct else 3
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


TEMPLATES.filters.update(num=_fmt, interval=_fmt_ci)


def _label(column: str) -> str:
    """Display name of a score column."""
    return SCORES[column].label if column in SCORES else column


def _ordered(keys: Iterable[str], known: Iterable[str]) -> list[str]:
    """``keys`` in the order of ``known``, then any others by name."""
    return [k for k in known if k in keys] + sorted(set(keys) - set(known))


# ---------------------------------------------------------------- table access


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    """A column as float64 numpy, nulls as NaN; all-NaN when the column is absent."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    col = pc.cast(table.column(name), pa.float64())
    return np.asarray(pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False), dtype=float)


def _bool_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A boolean column as ``(values, valid)`` numpy arrays (nulls are not valid)."""
    col = table.column(name)
    valid = np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(pc.fill_null(col, False).to_numpy(zero_copy_only=False), dtype=bool)
    return values, valid


def _ok_mask(table: pa.Table) -> np.ndarray:
    """Rows whose EZ status is ``ok`` and whose EZ score is finite."""
    if "ez_status" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    status = pc.fill_null(pc.equal(table.column("ez_status"), EZ_OK), False)
    ok = np.asarray(status.to_numpy(zero_copy_only=False), dtype=bool)
    return ok & np.isfinite(_float_column(table, "ez_score"))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested mappings as ``(dotted.key, text)`` pairs; secrets redacted."""
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if SECRET_KEY.search(str(key)):
            rows.append((path, "(redacted)"))
        elif isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, path))
        else:
            rows.append((path, _plain(value)))
    return rows


def _plain(value: Any) -> str:
    """A config value as readable text."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


# ---------------------------------------------------------------- sections as plain values


def _metrics(summary: Summary) -> dict[str, Any]:
    """The attack-performance section: a row per score, operating points, skipped scores."""
    metrics = summary.metrics
    order = _ordered(metrics, SCORES)
    points = [(_label(c), f"{100 * FPR_POINTS[name]:g}%", at) for c in order
              for name, at in metrics[c].operating_points.items()]  # fmt: skip
    return {
        "names": METRICS,
        "heads": [metric_label(name) for name in METRICS],
        "rows": [(_label(c), metrics[c]) for c in order],
        "points": points,
        "skipped": [(_label(c), r) for c, r in summary.metrics_skipped.items()],
    }


def _cell(column: str, value: Any) -> tuple[str, str]:
    """``(css class, text)`` of one records-table cell; texts cut to TEXT_LIMIT characters."""
    if value is None:
        return "", ""
    if column == "text":
        text = str(value)
        return "txt", text[:TEXT_LIMIT] + ("\u2026" if len(text) > TEXT_LIMIT else "")
    if column == "id":
        return "id", str(value)
    if isinstance(value, bool):
        return "", "yes" if value else "no"
    if _is_num(value):
        return "num", _fmt(value, ".4g")
    return "", str(value)


def _records(rows: pa.Table, show_status: bool = False) -> dict[str, Any]:
    """Records as table columns and cells: id, EZ, label/flag/status when known, text."""
    names = rows.column_names
    cols = ["id", "ez_score"] + [c for c in ("n_tokens", "is_member", "flagged") if c in names]
    cols += ["ez_status"] if show_status else []
    cols += ["text"] if "text" in names else []
    records = rows.select([c for c in cols if c in names]).to_pylist()
    return {"columns": cols, "rows": [[_cell(c, r.get(c)) for c in cols] for r in records]}


def _top_records(table: pa.Table) -> dict[str, Any] | None:
    """The TOP_N ok rows with the highest EZ score; None without ok rows."""
    ez = _float_column(table, "ez_score")
    ok = np.flatnonzero(_ok_mask(table))
    if ok.size == 0:
        return None
    return _records(table.take(ok[np.argsort(-ez[ok], kind="stable")[:TOP_N]]))


def _review(table: pa.Table) -> dict[str, Any] | None:
    """Up to TOP_N rows with a status that scores 0.0 but may signal membership."""
    if "ez_status" not in table.column_names:
        return None
    statuses = table.column("ez_status").to_pylist()
    idx = [i for i, s in enumerate(statuses) if s in REVIEW_STATUSES]
    if not idx:
        return None
    return {"count": len(idx), **_records(table.take(idx[:TOP_N]), show_status=True)}


# ---------------------------------------------------------------- chart coordinates


def _points(xs: np.ndarray, ys: np.ndarray) -> str:
    """SVG polyline points, with consecutive duplicate pixels removed."""
    pts = np.round(np.column_stack([xs, ys]), 1)
    keep = np.ones(len(pts), dtype=bool)
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
    return " ".join(f"{x:g},{y:g}" for x, y in pts[keep])


def _roc(table: pa.Table, metrics: Mapping[str, MetricsBase]) -> dict[str, Any] | None:
    """ROC curves of every score with finite values in both classes, log-scale FPR axis from
    FPR_MIN to 1, as chart coordinates; None when no score has a curve."""
    labels, valid = _bool_column(table, "is_member")
    box = {"w": 760, "h": 440, "left": 60, "top": 20, "pw": 480, "ph": 370}
    lo = math.log10(FPR_MIN)

    def px(fpr: Any) -> np.ndarray:
        return box["left"] + (np.log10(np.clip(fpr, FPR_MIN, 1.0)) - lo) / -lo * box["pw"]

    def py(tpr: Any) -> np.ndarray:
        return box["top"] + (1.0 - np.asarray(tpr, dtype=float)) * box["ph"]

    curves = []
    for column in [c for c in SCORES if c in table.column_names]:
        score = _float_column(table, column)
        mask = valid & np.isfinite(score)
        y = labels[mask]
        if y.all() or not y.any():
            continue
        fpr, tpr = roc(y, score[mask])
        auc = metrics[column].auc if column in metrics else None
        curves.append({
            "label": SCORES[column].label,
            "color": SCORES[column].color,
            "width": 2.6 if column == "ez_score" else 1.6,
            "points": _points(px(fpr), py(tpr)),
            "auc": f"{auc if _is_num(auc) else point_metrics(y, score[mask])['auc']:.3f}",
        })  # fmt: skip
    if not curves:
        return None
    diag = np.logspace(lo, 0, 80)
    decades = [10.0**e for e in range(int(lo), 1)]
    return {
        **box,
        "curves": curves,
        "chance": _points(px(diag), py(diag)),
        "xticks": [(round(float(px(f)), 1), f"{f:g}") for f in decades],
        "markers": [round(float(px(f)), 1) for f in (1e-3, 1e-2)],
        "yticks": [(round(float(py(t)), 1), f"{t:.1f}") for t in np.linspace(0, 1, 6)],
        "fpr_min": f"{FPR_MIN:g}",
    }


def _histogram(
    series: Sequence[tuple[str, np.ndarray, str]], threshold: Any = None, density: bool = True
) -> dict[str, Any] | None:
    """Overlaid histograms of EZ scores on a log1p scale, shared bins clipped at the p99, as
    chart coordinates; None when no series has a value.

    ``series`` holds ``(label, raw EZ values, colour)``; ``threshold`` (raw EZ) draws a line.
    """
    data = [(lab, np.log1p(np.maximum(v[np.isfinite(v)], 0.0)), c) for lab, v, c in series]
    data = [d for d in data if d[1].size]
    if not data:
        return None
    pooled = np.concatenate([v for _, v, _ in data])
    lo, hi = float(pooled.min()), float(np.percentile(pooled, HIST_CLIP_PERCENTILE))
    if not hi > lo:
        hi = float(pooled.max()) if pooled.max() > lo else lo + 1.0
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    heights = [
        np.histogram(np.clip(v, lo, hi), bins=edges)[0] / (v.size if density else 1)
        for _, v, _ in data
    ]
    ymax = max(float(hs.max()) for hs in heights) or 1.0
    if not density:
        ymax = 4.0 * math.ceil(ymax / 4.0)  # integer count ticks
    box = {"w": 760, "h": 320, "left": 60, "top": 20, "pw": 520, "ph": 250}
    bw = box["pw"] / HIST_BINS

    def px(t: float) -> float:
        return round(box["left"] + (t - lo) / (hi - lo) * box["pw"], 1)

    bottom = box["top"] + box["ph"]
    bars = [
        (round(box["left"] + i * bw, 1), round(bottom - v / ymax * box["ph"], 1),
         round(bw, 1), round(v / ymax * box["ph"], 1), color)
        for (_, _, color), hs in zip(data, heights, strict=True)
        for i, v in enumerate(hs)
    ]  # fmt: skip
    line = None
    if _is_num(threshold):
        at = float(np.clip(np.log1p(max(float(threshold), 0.0)), lo, hi))
        line = {"x": px(at), "label": f"threshold {float(threshold):.3g}"}
    return {
        **box,
        "bars": bars,
        "legend": [(lab, v.size, c) for lab, v, c in data],
        "xticks": [(px(t), f"{float(np.expm1(t)):.3g}") for t in np.linspace(lo, hi, 6)],
        "yticks": [
            (
                round(bottom - f * box["ph"], 1),
                f"{100 * f * ymax:.1f}%" if density else f"{f * ymax:.0f}",
            )
            for f in np.linspace(0, 1, 5)
        ],  # fmt: skip
        "threshold": line,
        "density": density,
        "clip": f"{HIST_CLIP_PERCENTILE:g}",
    }


def _ez_series(table: pa.Table, mode: str) -> list[tuple[str, np.ndarray, str]]:
    """The EZ histogram's groups (ok rows): members and non-members, flagged and not, or
    all rows."""
    ez, ok = _float_column(table, "ez_score"), _ok_mask(table)
    if mode == "leakage":
        labels, valid = _bool_column(table, "is_member")
        return [("members", ez[ok & valid & labels], "#d62728"),
                ("non-members", ez[ok & valid & ~labels], "#1f77b4")]  # fmt: skip
    if mode == "detection" and "flagged" in table.column_names:
        flagged, valid = _bool_column(table, "flagged")
        return [("flagged", ez[ok & valid & flagged], "#d62728"),
                ("not flagged", ez[ok & ~(valid & flagged)], "#6b7280")]  # fmt: skip
    return [("candidates" if mode == "detection" else "all rows", ez[ok], "#1f77b4")]


# ---------------------------------------------------------------- entry point


def render_report(summary: Summary, scores: pa.Table) -> str:
    """One self-contained HTML document auditing a run from its summary and score table.

    Pure: no I/O. Texts appear only when ``scores`` has a ``text`` column.
    """
    mode, detection = summary.mode, summary.detection
    labelled = mode == "leakage" and "is_member" in scores.column_names
    histogram = None
    if labelled or mode != "leakage":
        threshold = detection.threshold if detection else None
        histogram = _histogram(_ez_series(scores, mode), threshold, density=mode != "detection")
    config = _flatten(summary.config)
    return TEMPLATES.get_template("report.html.j2").render(
        summary=summary,
        colors=VERDICT_COLORS.get(summary.verdict.level, VERDICT_COLORS["unknown"]),
        models=_flatten(summary.models.dump()),
        essentials=[(k, v) for k, v in config if ESSENTIAL_KEY.search(k)],
        config=config,
        statuses=_ordered(summary.status_counts, EZ_STATUSES),
        notes=STATUS_NOTES,
        scores=[score for c, score in SCORES.items() if c in summary.metrics],
        metrics=_metrics(summary) if mode == "leakage" else None,
        labelled=labelled,
        roc=_roc(scores, summary.metrics) if labelled else None,
        histogram=histogram,
        top=_top_records(scores),
        review=_review(scores),
    )
