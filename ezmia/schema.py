"""The versioned schemas of every table ezmia writes (scores, index, ledger, alerts).

Analysts query these with DuckDB, Athena or Spark; bump ``SCHEMA_VERSION`` on any change.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

SCORE_FIELDS = [
    pa.field("ez_score", pa.float64()),
    pa.field("ez_status", pa.string()),
    pa.field("n_tokens", pa.int32()),
    pa.field("n_scored", pa.int32()),
    pa.field("n_errors", pa.int32()),
    pa.field("truncated", pa.bool_()),
    pa.field("loss", pa.float64()),
    pa.field("ref_ratio", pa.float64()),
    pa.field("zlib", pa.float64()),
    pa.field("min_k", pa.float64()),
    pa.field("min_k_pp", pa.float64()),
    pa.field("text_sha256", pa.string()),
    pa.field("source_row", pa.int64()),
]
"""Columns of ``scores/*.parquet`` after ``id``; then ``is_member``/``flagged``/``text``
when present. Every score column: higher = more member-like."""


def scores_schema(
    id_type: pa.DataType, labelled: bool, flagged: bool, with_text: bool
) -> pa.Schema:
    """The scores table's schema for one audit's options."""
    fields = [pa.field("id", id_type), *SCORE_FIELDS]
    if labelled:
        fields.append(pa.field("is_member", pa.bool_()))
    if flagged:
        fields.append(pa.field("flagged", pa.bool_()))
    if with_text:
        fields.append(pa.field("text", pa.string()))
    return pa.schema(fields, metadata={"ezmia_schema_version": str(SCHEMA_VERSION)})
