"""Scoring rows in two steps: tokenize (CPU), then both passes and every score (backend).

The local engine runs both steps in this process; the Ray engine runs the first as CPU
tasks and the second on its scoring actors. Nothing here knows where rows come from or go.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ezmia.backends.base import ScoringBackend
from ezmia.errors import ModelError
from ezmia.io import ROW_INDEX
from ezmia.schema import scores_schema
from ezmia.scores import score_sequence
from ezmia.text import tokenize

TOKEN_COLUMNS = ("input_ids", "truncated", "zlib_size", "text_sha256")


def tokenize_rows(rows: pa.Table, tokenizer, max_length: int) -> pa.Table:
    """Add ``input_ids``, ``truncated``, ``zlib_size`` and ``text_sha256`` to rows."""
    tokens = tokenize(tokenizer, rows.column("text").to_pylist(), max_length)
    columns = {
        "input_ids": pa.array(tokens.input_ids, pa.list_(pa.int32())),
        "truncated": pa.array(tokens.truncated, pa.bool_()),
        "zlib_size": pa.array(tokens.zlib_size, pa.int64()),
        "text_sha256": pa.array(tokens.text_sha256, pa.string()),
    }
    for name, values in columns.items():
        rows = rows.append_column(name, values)
    return rows


def score_tokenized(
    rows: pa.Table,
    backend: ScoringBackend,
    include_text: bool,
    flag_threshold: float | None = None,
) -> pa.Table:
    """Score tokenized rows into the scores schema; with ``flag_threshold`` (detection
    mode), rows scoring above it are ``flagged``."""
    check_token_range(rows, backend.vocab_size)
    input_ids = rows.column("input_ids").to_pylist()
    stats = backend.token_stats(input_ids)
    zlib_sizes = rows.column("zlib_size").to_pylist()
    scored = [
        score_sequence(s, len(ids), size)
        for s, ids, size in zip(stats, input_ids, zlib_sizes, strict=True)
    ]
    labelled = "is_member" in rows.column_names
    detection = flag_threshold is not None
    schema = scores_schema(rows.schema.field("id").type, labelled, detection, include_text)
    columns: dict = {name: [row[name] for row in scored] for name in scored[0]} if scored else {}
    columns["n_tokens"] = [len(ids) for ids in input_ids]
    columns["source_row"] = rows.column(ROW_INDEX)
    columns["backend"] = [backend.name] * rows.num_rows
    if detection:
        columns["flagged"] = [row["ez_score"] > flag_threshold for row in scored]
    for name in ("id", "truncated", "text_sha256", "is_member", "text"):
        if name in schema.names:
            columns[name] = rows.column(name)
    return pa.table({f.name: columns.get(f.name, []) for f in schema}, schema=schema)


def check_token_range(rows: pa.Table, vocab_size: int | None) -> None:
    """Refuse token ids outside ``0..vocab_size-1`` before they reach an embedding lookup (the
    planning check compares the tokenizer with the configs; this one sees the actual ids)."""
    ids = pc.list_flatten(rows.column("input_ids"))
    if vocab_size is None or not len(ids):
        return
    bounds = pc.min_max(ids).as_py()
    if bounds["min"] >= 0 and bounds["max"] < vocab_size:
        return
    for row, sequence in zip(
        rows.column(ROW_INDEX).to_pylist(), rows.column("input_ids").to_pylist(), strict=True
    ):
        bad = next((i for i in sequence if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise ModelError(
                f"source row {row}: token id {bad} is outside the models' vocabulary (ids 0 to "
                f"{vocab_size - 1}): the tokenizer does not match the models; use the tokenizer "
                "they were trained with"
            )
