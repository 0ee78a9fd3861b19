"""Scoring one batch of rows: text -> tokens -> both passes -> every score.

The local engine calls it on the whole dataset in chunks; the Ray engine's actors call it on
each block. Nothing here knows where the rows came from or where they go.
"""

from __future__ import annotations

import pyarrow as pa

from ezmia.backends.base import ScoringBackend
from ezmia.io import ROW_INDEX
from ezmia.schema import scores_schema
from ezmia.scores import score_sequence
from ezmia.text import tokenize


def score_rows(
    rows: pa.Table,
    backend: ScoringBackend,
    tokenizer,
    max_length: int,
    include_text: bool,
    flag_threshold: float | None = None,
) -> pa.Table:
    """Score rows with columns ``id``, ``text`` (and ``is_member``) into the scores schema;
    with ``flag_threshold`` (detection mode), rows scoring above it are ``flagged``."""
    texts = rows.column("text").to_pylist()
    tokens = tokenize(tokenizer, texts, max_length)
    stats = backend.token_stats(tokens.input_ids)
    scored = [
        score_sequence(s, len(ids), size)
        for s, ids, size in zip(stats, tokens.input_ids, tokens.zlib_size, strict=True)
    ]
    labelled = "is_member" in rows.column_names
    detection = flag_threshold is not None
    schema = scores_schema(rows.schema.field("id").type, labelled, detection, include_text)
    columns = {name: [row[name] for row in scored] for name in scored[0]} if scored else {}
    columns.update(
        id=rows.column("id"),
        n_tokens=[len(ids) for ids in tokens.input_ids],
        truncated=tokens.truncated,
        text_sha256=tokens.text_sha256,
        source_row=rows.column(ROW_INDEX),
    )
    if labelled:
        columns["is_member"] = rows.column("is_member")
    if detection:
        columns["flagged"] = [row["ez_score"] > flag_threshold for row in scored]
    if include_text:
        columns["text"] = rows.column("text")
    return pa.table({f.name: columns.get(f.name, []) for f in schema}, schema=schema)
