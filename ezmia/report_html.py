"""Self-contained HTML audit report: one pure function from a run summary and its scores.

No I/O and no external resources: charts are inline SVG generated here, styles are inline
CSS, there is no JavaScript, so the file renders offline. Everything that comes from data
(ids, texts, names, config values) goes through ``html.escape``.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ezmia.metrics import point_metrics, roc
from ezmia.scores import (
    EZ_EMPTY,
    EZ_NO_NEGATIVE_SHIFT,
    EZ_NON_FINITE,
    EZ_OK,
    EZ_STATUSES,
    EZ_TOO_FEW_ERRORS,
    EZ_TOO_SHORT,
    SCORE_COLUMNS,
)

TOP_N = 20
TEXT_LIMIT = 300
FPR_MIN = 1e-4
HIST_BINS = 40
HIST_CLIP_PERCENTILE = 99.0

SCORE_LABELS: dict[str, str] = {
    "ez_score": "EZ-MIA",
    "loss": "LOSS",
    "ref_ratio": "Reference ratio",
    "zlib": "zlib",
    "min_k": "Min-K%",
    "min_k_pp": "Min-K%++",
}
SCORE_COLORS: dict[str, str] = {
    "ez_score": "#d62728",
    "loss": "#1f77b4",
    "ref_ratio": "#2ca02c",
    "zlib": "#9467bd",
    "min_k": "#ff7f0e",
    "min_k_pp": "#8c564b",
}
EXTRA_COLORS = ("#17becf", "#e377c2", "#7f7f7f", "#bcbd22")

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

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0;background:#fafafa;color:#1f2328;line-height:1.45}
main{max-width:1000px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 16px}
.verdict{border-left:6px solid;padding:12px 16px;border-radius:4px;font-size:1.08em}
.verdict b{text-transform:uppercase;letter-spacing:.04em}
.verdict .warning{color:#92400e;font-size:.95em}
table{border-collapse:collapse;margin:6px 0 10px;font-size:.92em;background:#fff}
th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.txt{max-width:520px;word-break:break-word;font-size:.9em}
td.id{word-break:break-all;min-width:7em;max-width:220px}
.note{color:#57606a;font-size:.9em}
.warn{color:#b45309}
svg{background:#fff;border:1px solid #d8dee4;display:block;margin:8px 0}
details{margin:6px 0}
code{background:#f3f4f6;padding:0 3px;border-radius:3px}
"""


# ---------------------------------------------------------------- small helpers


def _esc(value: Any) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape(str(value), quote=True)


def _is_num(value: Any) -> bool:
    """True for a finite real number (not a bool)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _fmt(value: Any, digits: int = 3) -> str:
    """A number with fixed decimals; an em dash when missing or not finite."""
    return f"{float(value):.{digits}f}" if _is_num(value) else "&mdash;"


def _fmt_sig(value: Any, sig: int = 4) -> str:
    """A number with ``sig`` significant digits; an em dash when missing."""
    return f"{float(value):.{sig}g}" if _is_num(value) else "&mdash;"


def _fmt_pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage; an em dash when missing."""
    return f"{100 * float(value):.{digits}f}%" if _is_num(value) else "&mdash;"


def _fmt_ci(ci: Any, pct: bool) -> str:
    """A ``[lo, hi]`` interval as small text, empty when absent."""
    if not isinstance(ci, Sequence) or len(ci) != 2 or not all(_is_num(v) for v in ci):
        return ""
    lo, hi = (100 * float(v) if pct else float(v) for v in ci)
    digits = 1 if pct else 3
    return f' <span class="note">[{lo:.{digits}f}, {hi:.{digits}f}]</span>'


def _section(title: str, body: str) -> str:
    """An ``<h2>`` section."""
    return f"<section><h2>{_esc(title)}</h2>\n{body}\n</section>"


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column key/value table; values are escaped."""
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _label(column: str) -> str:
    """Display name of a score column."""
    return SCORE_LABELS.get(column, column)


def _color(column: str, index: int) -> str:
    """Line colour of a score column."""
    return SCORE_COLORS.get(column, EXTRA_COLORS[index % len(EXTRA_COLORS)])


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


def _score_columns(table: pa.Table) -> list[str]:
    """Known score columns present in the table, in the canonical order."""
    return [c for c in SCORE_COLUMNS if c in table.column_names]


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as ``(dotted.key, value)`` pairs; secrets redacted."""
    if not isinstance(data, Mapping):
        return [(prefix, data)] if prefix else []
    rows: list[tuple[str, Any]] = []
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


# ---------------------------------------------------------------- sections


def _header(summary: Mapping[str, Any], table: pa.Table) -> str:
    """Title line and a one-line description of the run."""
    name = summary.get("name") or "unnamed run"
    n_rows = summary.get("n_rows", table.num_rows)
    mode = summary.get("mode", "scores")
    return (
        f"<h1>EZ-MIA privacy audit: {_esc(name)}</h1>"
        f'<p class="sub">{_esc(n_rows)} records &middot; mode: {_esc(mode)}</p>'
    )


def _verdict_block(summary: Mapping[str, Any]) -> str:
    """The verdict in plain language, coloured by level."""
    verdict = summary.get("verdict") or {}
    level = str(verdict.get("level", "unknown"))
    fg, bg = VERDICT_COLORS.get(level, VERDICT_COLORS["unknown"])
    text = verdict.get("text") or "No verdict was produced for this run."
    title = "Detection" if summary.get("mode") == "detection" else "Leakage risk"
    notes = "".join(
        f'<p class="warning"><b>Warning:</b> {_esc(w)}</p>' for w in verdict.get("warnings", [])
    )
    if verdict.get("privacy"):
        notes += f"<p>{_esc(verdict['privacy'])}</p>"
    return (
        f'<div class="verdict" style="border-color:{fg};background:{bg}">'
        f'<b style="color:{fg}">{title}: {_esc(level)}</b><br>{_esc(text)}{notes}</div>'
    )


def _config_section(summary: Mapping[str, Any]) -> str:
    """Models and data in short, the full configuration folded."""
    models = _flatten(summary.get("models") or {})
    config = _flatten(summary.get("config") or {})
    essentials = [(k, v) for k, v in config if ESSENTIAL_KEY.search(k)]
    parts = []
    if models:
        parts.append("<h3>Models</h3>" + _kv_table(models))
    if essentials:
        parts.append("<h3>Data and settings</h3>" + _kv_table(essentials))
    if config:
        parts.append(
            "<details><summary>Full configuration</summary>" + _kv_table(config) + "</details>"
        )
    return _section("What was audited", "".join(parts) or '<p class="note">No configuration.</p>')


def _status_counts(summary: Mapping[str, Any], table: pa.Table) -> dict[str, int]:
    """Status counts from the summary, else counted from the table."""
    counts = summary.get("status_counts")
    if isinstance(counts, Mapping) and counts:
        return {str(k): int(v) for k, v in counts.items()}
    if "ez_status" not in table.column_names:
        return {}
    values = pc.value_counts(table.column("ez_status")).to_pylist()
    return {str(v["values"]): int(v["counts"]) for v in values}


def _status_section(summary: Mapping[str, Any], table: pa.Table) -> str:
    """Status counts with a one-line explanation each, then the rows to look at."""
    counts = _status_counts(summary, table)
    total = sum(counts.values()) or 1
    order = [s for s in EZ_STATUSES if s in counts] + sorted(set(counts) - set(EZ_STATUSES))
    rows = "".join(
        f"<tr><td><code>{_esc(s)}</code></td><td class='num'>{counts[s]}</td>"
        f"<td class='num'>{_fmt_pct(counts[s] / total)}</td>"
        f"<td>{_esc(STATUS_NOTES.get(s, 'Unrecognised status.'))}</td></tr>"
        for s in order
    )
    body = (
        "<table><tr><th>EZ status</th><th>rows</th><th>share</th><th>meaning</th></tr>"
        f"{rows}</table>"
    )
    return _section("Scoring status", body)


def _review_rows(table: pa.Table) -> str:
    """Up to TOP_N rows with a status that scores 0.0 but may signal membership."""
    if "ez_status" not in table.column_names:
        return ""
    statuses = table.column("ez_status").to_pylist()
    idx = [i for i, s in enumerate(statuses) if s in REVIEW_STATUSES]
    if not idx:
        return ""
    note = (
        f'<p class="warn">{len(idx)} row(s) score 0.0 only because of an edge case of the '
        f"EZ formula (see Scoring status); the first {min(len(idx), TOP_N)} are listed:</p>"
    )
    body = note + _records_table(table.take(idx[:TOP_N]), show_status=True)
    return _section("Rows scored 0.0 that may leak", body)


def _metrics_section(summary: Mapping[str, Any]) -> str:
    """AUC and TPR at low FPR with their 95% intervals, one row per score."""
    metrics = summary.get("metrics") or {}
    order = [c for c in SCORE_COLUMNS if c in metrics] + sorted(set(metrics) - set(SCORE_COLUMNS))
    rows = "".join(_metrics_row(c, metrics[c]) for c in order)
    head = (
        "<tr><th>score</th><th>AUC</th><th>TPR @ 1% FPR</th><th>TPR @ 0.1% FPR</th><th>n</th></tr>"
    )
    body = f"<table>{head}{rows}</table>" if rows else '<p class="note">No metrics.</p>'
    body += (
        '<p class="note">Bracketed: bootstrap 95% confidence intervals. Low-FPR figures on a '
        "few thousand records are noisy; read them with their interval.</p>"
    )
    return _section("Attack performance", body + _skipped_list(summary))


def _metrics_row(column: str, m: Mapping[str, Any]) -> str:
    """One metrics table row."""
    cells = [
        _fmt(m.get("auc")) + _fmt_ci(m.get("auc_ci95"), pct=False),
        _fmt_pct(m.get("tpr_at_1pct_fpr")) + _fmt_ci(m.get("tpr_at_1pct_fpr_ci95"), pct=True),
        _fmt_pct(m.get("tpr_at_0_1pct_fpr")) + _fmt_ci(m.get("tpr_at_0_1pct_fpr_ci95"), pct=True),
        _esc(m.get("n", "")),
    ]
    tds = "".join(f"<td class='num'>{c}</td>" for c in cells)
    return f"<tr><th>{_esc(_label(column))}</th>{tds}</tr>"


def _skipped_list(summary: Mapping[str, Any]) -> str:
    """Scores without metrics, with the reason."""
    skipped = summary.get("metrics_skipped") or {}
    if not skipped:
        return ""
    items = "".join(
        f"<li><b>{_esc(_label(str(c)))}</b>: {_esc(r)}</li>" for c, r in skipped.items()
    )
    return f'<p class="note">Not evaluated:</p><ul class="note">{items}</ul>'


def _detection_section(summary: Mapping[str, Any]) -> str:
    """Threshold and flagged count of a detection run."""
    det = summary.get("detection") or {}
    n_flagged, n_cand = det.get("n_flagged"), det.get("n_candidates")
    share = f" ({_fmt_pct(n_flagged / n_cand)})" if _is_num(n_flagged) and n_cand else ""
    rows = (
        f"<tr><th>target FPR</th><td class='num'>{_fmt_pct(det.get('fpr'), 2)}</td></tr>"
        f"<tr><th>EZ threshold</th><td class='num'>{_fmt_sig(det.get('threshold'))}</td></tr>"
        f"<tr><th>flagged</th><td class='num'>{_esc(n_flagged)} of {_esc(n_cand)}{share}</td>"
        f"</tr><tr><th>calibration non-members</th>"
        f"<td class='num'>{_esc(det.get('n_calibration'))}</td></tr>"
    )
    note = (
        '<p class="note">The threshold is the calibration non-members\' EZ quantile for the '
        "target FPR: about that share of true non-members would be flagged by chance. Flags "
        "well above it point at training data.</p>"
    )
    return f"<table>{rows}</table>{note}"


def _records_table(rows: pa.Table, show_status: bool = False) -> str:
    """Records as an HTML table: id, EZ, optional label/flag/status, text if present."""
    names = rows.column_names
    cols = ["id", "ez_score"] + [c for c in ("n_tokens", "is_member", "flagged") if c in names]
    if show_status:
        cols.append("ez_status")
    if "text" in names:
        cols.append("text")
    head = "<tr><th>#</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td class='num'>{i + 1}</td>"
        + "".join(_record_cell(c, r.get(c)) for c in cols)
        + "</tr>"
        for i, r in enumerate(rows.select([c for c in cols if c in names]).to_pylist())
    )
    return f"<table>{head}{body}</table>"


def _record_cell(column: str, value: Any) -> str:
    """One escaped cell of a records table; texts truncated to TEXT_LIMIT characters."""
    if value is None:
        return "<td></td>"
    if column == "text":
        text = str(value)
        cut = text[:TEXT_LIMIT] + ("\u2026" if len(text) > TEXT_LIMIT else "")
        return f"<td class='txt'>{_esc(cut)}</td>"
    if column == "id":
        return f"<td class='id'>{_esc(value)}</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if _is_num(value):
        return f"<td class='num'>{_fmt_sig(value)}</td>"
    return f"<td>{_esc(value)}</td>"


def _top_records_table(table: pa.Table) -> str:
    """The TOP_N ok rows with the highest EZ score."""
    ez = _float_column(table, "ez_score")
    ok = np.flatnonzero(_ok_mask(table))
    if ok.size == 0:
        return _section("Records that leak most", '<p class="note">No ok rows.</p>')
    top = ok[np.argsort(-ez[ok], kind="stable")[:TOP_N]]
    note = (
        f'<p class="note">Highest EZ score among rows with status ok ({len(top)} shown). '
        "Edge-case rows scored 0.0 (no_negative_shift, too_few_errors) are not ranked here; "
        "they are listed below when there are any.</p>"
    )
    return _section("Records that leak most", note + _records_table(table.take(top)))


def _run_details(summary: Mapping[str, Any]) -> str:
    """Backend and timings, folded."""
    backend = summary.get("backend") or {}
    timings = summary.get("timings") or {}
    rows = [("backend", backend.get("name", "?")), ("backend choice", backend.get("reason", ""))]
    rows += [(f"time: {k}", f"{float(v):.1f} s" if _is_num(v) else v) for k, v in timings.items()]
    return _section(
        "Run details",
        "<details open><summary>Backend and timings</summary>" + _kv_table(rows) + "</details>",
    )


# ---------------------------------------------------------------- SVG charts


def _svg_open(width: int, height: int, title: str) -> str:
    """Opening ``<svg>`` tag with an accessible title."""
    return (
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="12" '
        f'role="img"><title>{_esc(title)}</title>'
    )


def _polyline(xs: np.ndarray, ys: np.ndarray, color: str, width: float, dash: str = "") -> str:
    """An SVG polyline, with consecutive duplicate pixels removed."""
    pts = np.round(np.column_stack([xs, ys]), 1)
    keep = np.ones(len(pts), dtype=bool)
    keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
    coords = " ".join(f"{x:g},{y:g}" for x, y in pts[keep])
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<polyline points="{coords}" fill="none" stroke="{color}" '
        f'stroke-width="{width}"{dash_attr}/>'
    )


def _roc_curves(
    table: pa.Table, metrics: Mapping[str, Any]
) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(column, fpr, tpr, auc)`` for each score with finite values in both classes."""
    if "is_member" not in table.column_names:
        return []
    labels, valid = _bool_column(table, "is_member")
    curves = []
    for column in _score_columns(table):
        score = _float_column(table, column)
        mask = valid & np.isfinite(score)
        y = labels[mask]
        if y.all() or not y.any():
            continue
        fpr, tpr = roc(y, score[mask])
        auc = (metrics.get(column) or {}).get("auc")
        if not _is_num(auc):
            auc = point_metrics(y, score[mask])["auc"]
        curves.append((column, fpr, tpr, float(auc)))
    return curves


def _roc_svg(table: pa.Table, metrics: Mapping[str, Any]) -> str:
    """ROC curves of all scores on one chart, log-scale FPR axis from FPR_MIN to 1."""
    curves = _roc_curves(table, metrics)
    if not curves:
        return '<p class="note">ROC needs finite scores for both members and non-members.</p>'
    w, h, left, top, pw, ph = 760, 440, 60, 20, 480, 370
    lo = math.log10(FPR_MIN)

    def px(fpr: np.ndarray) -> np.ndarray:
        return left + (np.log10(np.clip(fpr, FPR_MIN, 1.0)) - lo) / -lo * pw

    def py(tpr: np.ndarray) -> np.ndarray:
        return top + (1.0 - np.asarray(tpr, dtype=float)) * ph

    parts = [_svg_open(w, h, "ROC curves, log-scale false positive rate")]
    parts.append(_roc_grid(px, py, left, top, pw, ph))
    diag = np.logspace(lo, 0, 80)
    parts.append(_polyline(px(diag), py(diag), "#9ca3af", 1, "4 3"))
    for i, (column, fpr, tpr, auc) in enumerate(curves):
        width = 2.6 if column == "ez_score" else 1.6
        parts.append(_polyline(px(fpr), py(tpr), _color(column, i), width))
        ly = top + 14 + 20 * i
        parts.append(
            f'<line x1="{left + pw + 20}" y1="{ly - 4}" x2="{left + pw + 44}" y2="{ly - 4}" '
            f'stroke="{_color(column, i)}" stroke-width="{width}"/>'
            f'<text x="{left + pw + 50}" y="{ly}">{_esc(_label(column))} '
            f"(AUC {auc:.3f})</text>"
        )
    ly = top + 14 + 20 * len(curves)
    parts.append(
        f'<line x1="{left + pw + 20}" y1="{ly - 4}" x2="{left + pw + 44}" y2="{ly - 4}" '
        f'stroke="#9ca3af" stroke-dasharray="4 3"/><text x="{left + pw + 50}" y="{ly}">chance'
        "</text></svg>"
    )
    note = (
        '<p class="note">Log-scale FPR: the left of the chart is what matters for privacy. '
        f"Dotted verticals at 0.1% and 1% FPR; FPR below {FPR_MIN:g} is drawn at the left "
        "edge.</p>"
    )
    return "".join(parts) + note


def _roc_grid(px: Any, py: Any, left: int, top: int, pw: int, ph: int) -> str:
    """Axes, decade ticks, TPR ticks and 0.1%/1% FPR markers of the ROC chart."""
    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for e in range(int(math.log10(FPR_MIN)), 1):
        x = float(px(np.array([10.0**e]))[0])
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{10.0**e:g}</text>'
        )
    for fpr in (1e-3, 1e-2):
        x = float(px(np.array([fpr]))[0])
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#bbb" '
            'stroke-dasharray="1 3"/>'
        )
    for t in np.linspace(0, 1, 6):
        y = float(py(np.array([t]))[0])
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.1f}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{top + ph + 34}" text-anchor="middle">'
        "false positive rate (log scale)</text>"
        f'<text transform="translate({left - 42},{top + ph / 2}) rotate(-90)" '
        'text-anchor="middle">true positive rate</text>'
    )
    return "".join(parts)


def _hist_edges(values: Sequence[np.ndarray]) -> np.ndarray:
    """Shared bin edges over log1p values, from the minimum to the 99th percentile."""
    pooled = np.concatenate([v for v in values if v.size])
    lo = float(pooled.min())
    hi = float(np.percentile(pooled, HIST_CLIP_PERCENTILE))
    if not hi > lo:
        hi = float(pooled.max()) if pooled.max() > lo else lo + 1.0
    return np.linspace(lo, hi, HIST_BINS + 1)


def _histogram_svg(
    series: Sequence[tuple[str, np.ndarray, str]],
    threshold: float | None = None,
    density: bool = True,
) -> str:
    """Overlaid histograms of EZ scores on log1p scale, shared bins, clipped at the p99.

    ``series`` holds ``(label, raw EZ values, colour)``; ``threshold`` (raw EZ) draws a line.
    """
    data = [(lab, np.log1p(np.maximum(v[np.isfinite(v)], 0.0)), c) for lab, v, c in series]
    data = [d for d in data if d[1].size]
    if not data:
        return '<p class="note">No rows with status ok to plot.</p>'
    edges = _hist_edges([d[1] for d in data])
    heights = [_bin_heights(v, edges, density) for _, v, _ in data]
    ymax = max(float(hs.max()) for hs in heights) or 1.0
    if not density:
        ymax = 4.0 * math.ceil(ymax / 4.0)  # integer count ticks
    w, h, left, top, pw, ph = 760, 320, 60, 20, 520, 250
    bw = pw / HIST_BINS
    parts = [_svg_open(w, h, "EZ score histogram")]
    parts.append(_hist_axes(edges, ymax, density, left, top, pw, ph))
    for (_, _, color), hs in zip(data, heights, strict=True):
        for i, v in enumerate(hs):
            bh = v / ymax * ph
            parts.append(
                f'<rect x="{left + i * bw:.1f}" y="{top + ph - bh:.1f}" width="{bw:.1f}" '
                f'height="{bh:.1f}" fill="{color}" fill-opacity="0.45"/>'
            )
    parts.append(_hist_legend(data, left + pw + 16, top))
    if threshold is not None and _is_num(threshold):
        parts.append(_threshold_line(float(threshold), edges, left, top, pw, ph))
    parts.append("</svg>")
    note = (
        '<p class="note">x: EZ score on a log1p scale (ticks show the raw score); values '
        f"above the {HIST_CLIP_PERCENTILE:g}th percentile are counted in the last bin."
        + (" Bars show each group's share, so groups of different size compare." if density else "")
        + "</p>"
    )
    return "".join(parts) + note


def _bin_heights(values: np.ndarray, edges: np.ndarray, density: bool) -> np.ndarray:
    """Counts (or shares) per bin, values beyond the edges clipped into the end bins."""
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts / max(values.size, 1) if density else counts.astype(float)


def _hist_axes(
    edges: np.ndarray, ymax: float, density: bool, left: int, top: int, pw: int, ph: int
) -> str:
    """Frame, x ticks (raw EZ values) and y ticks of a histogram."""
    parts = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for t in np.linspace(edges[0], edges[-1], 6):
        x = left + (t - edges[0]) / (edges[-1] - edges[0]) * pw
        parts.append(
            f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#888"/>'
            f'<text x="{x:.1f}" y="{top + ph + 17}" text-anchor="middle">'
            f"{float(np.expm1(t)):.3g}</text>"
        )
    for f in np.linspace(0, 1, 5):
        y = top + ph - f * ph
        label = f"{100 * f * ymax:.1f}%" if density else f"{f * ymax:.0f}"
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{top + ph + 36}" text-anchor="middle">'
        "EZ score (log1p scale)</text>"
    )
    return "".join(parts)


def _hist_legend(data: Sequence[tuple[str, np.ndarray, str]], x: float, top: int) -> str:
    """Legend boxes with group sizes."""
    return "".join(
        f'<rect x="{x}" y="{top + 20 * i}" width="14" height="12" fill="{c}" fill-opacity="0.6"/>'
        f'<text x="{x + 20}" y="{top + 20 * i + 11}">{_esc(lab)} (n={v.size})</text>'
        for i, (lab, v, c) in enumerate(data)
    )


def _threshold_line(
    threshold: float, edges: np.ndarray, left: int, top: int, pw: int, ph: int
) -> str:
    """A vertical line at the detection threshold (at the right edge if beyond p99)."""
    t = float(np.clip(np.log1p(max(threshold, 0.0)), edges[0], edges[-1]))
    x = left + (t - edges[0]) / (edges[-1] - edges[0]) * pw
    return (
        f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#111" '
        f'stroke-width="1.5" stroke-dasharray="6 3"/>'
        f'<text x="{x + 4:.1f}" y="{top + 12}">threshold {threshold:.3g}</text>'
    )


def _leakage_histogram(table: pa.Table) -> str:
    """EZ histograms of members vs non-members (ok rows only)."""
    ez = _float_column(table, "ez_score")
    ok = _ok_mask(table)
    labels, valid = _bool_column(table, "is_member")
    series = [
        ("members", ez[ok & valid & labels], "#d62728"),
        ("non-members", ez[ok & valid & ~labels], "#1f77b4"),
    ]
    return _section("EZ score distribution", _histogram_svg(series))


def _detection_histogram(table: pa.Table, threshold: Any) -> str:
    """EZ histogram of candidates (ok rows), split by flag when known, with the threshold."""
    ez = _float_column(table, "ez_score")
    ok = _ok_mask(table)
    if "flagged" in table.column_names:
        flagged, valid = _bool_column(table, "flagged")
        series = [
            ("flagged", ez[ok & valid & flagged], "#d62728"),
            ("not flagged", ez[ok & ~(valid & flagged)], "#6b7280"),
        ]
    else:
        series = [("candidates", ez[ok], "#1f77b4")]
    thr = float(threshold) if _is_num(threshold) else None
    return _histogram_svg(series, threshold=thr, density=False)


# ---------------------------------------------------------------- entry point


def _mode_sections(summary: Mapping[str, Any], table: pa.Table) -> list[str]:
    """The sections specific to the run's mode."""
    mode = summary.get("mode", "scores")
    if mode == "leakage" and "is_member" in table.column_names:
        metrics = summary.get("metrics") or {}
        return [
            _metrics_section(summary),
            _section("ROC curves", _roc_svg(table, metrics)),
            _leakage_histogram(table),
        ]
    if mode == "leakage":
        return [_metrics_section(summary)]
    if mode == "detection":
        threshold = (summary.get("detection") or {}).get("threshold")
        body = _detection_section(summary) + _detection_histogram(table, threshold)
        return [_section("Detection", body)]
    ez = _float_column(table, "ez_score")[_ok_mask(table)]
    return [_section("EZ score distribution", _histogram_svg([("all rows", ez, "#1f77b4")]))]


def render_report(summary: dict, scores: pa.Table) -> str:
    """One self-contained HTML document auditing a run from its summary and score table.

    Pure: no I/O. Texts appear only when ``scores`` has a ``text`` column.
    """
    sections = [
        _header(summary, scores),
        _verdict_block(summary),
        _config_section(summary),
        _status_section(summary, scores),
        *_mode_sections(summary, scores),
        _top_records_table(scores),
        _review_rows(scores),
        _run_details(summary),
    ]
    title = f"EZ-MIA audit: {summary.get('name') or 'unnamed run'}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )
