"""Scoring rows in stages, in the shape of batch inference:

    tokenize (CPU) -> model stage(s) -> score (CPU)

A model stage runs one backend's passes over tokenized rows and adds only compact
per-position list columns (``ROLE_COLUMNS``: true-token log-probs, top-1 hits, and Min-K%++'s
``mu``/``sigma`` where the backend sees the distribution). A full fine-tune has a target stage
and a reference stage, each holding one model; a LoRA target keeps both passes in one stage on
one copy of its base (adapter on, then off): half the memory of two stages, the same compute.
The score stage assembles ``TokenStats`` from those columns and computes every registered
score (``scores.score_sequence``). The local engine runs these functions in this process; the
Ray engine runs each model stage as its own actor pool. Nothing here knows where rows come
from or go.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ezmia.backends.base import PASS_DTYPES, Role, ScoringBackend, stats_from_columns
from ezmia.config import AuditConfig
from ezmia.data.datasets import ROW_INDEX
from ezmia.data.schema import scores_schema
from ezmia.data.text import tokenize
from ezmia.errors import ModelError
from ezmia.plan.checks import check_checkpoint
from ezmia.plan.fetch import resolve_model_dir, resolve_tokenizer_dir
from ezmia.plan.models import ModelPlan
from ezmia.stats.metrics import detection_threshold
from ezmia.stats.scores import score_sequence

PASS_TYPES = {name: pa.list_(pa.from_numpy_dtype(dtype)) for name, dtype in PASS_DTYPES.items()}
"""The per-position columns model stages add (``PASS_DTYPES``; dropped by the score stage)."""

log = logging.getLogger(__name__)


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


def model_stages(target_is_adapter: bool) -> list[Role]:
    """The model stages of an audit, in order: one for a LoRA target (both passes on one copy
    of the base), else the target's and the reference's."""
    return ["both"] if target_is_adapter else ["target", "reference"]


def stage_models(config: AuditConfig, planned: ModelPlan, role: Role) -> ModelPlan:
    """The driver's plan with this stage's models resolved on this node: the weights it
    loads (a reference stage never downloads the target) and the tokenizer's small files,
    each fetched once per machine. The files fetched pass the same safety checks as the
    driver's (cheap: configs and safetensors headers), in case the checkpoint changed since;
    nothing is fingerprinted again. The folders of models the stage does not load stay the
    driver's."""
    needed = ["target", "reference"] if role == "both" else [role]
    resolved = {name: resolve_model_dir(planned.sources[name], config.cache_dir) for name in needed}
    for path in resolved.values():
        check_checkpoint(
            path, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code
        )
    resolved["tokenizer"] = resolve_tokenizer_dir(planned.sources["tokenizer"], config.cache_dir)
    return dataclasses.replace(planned, **resolved)


class ModelStage:
    """One model stage: its backend on ``models`` (resolved on this node), then ``__call__``
    adds the stage's per-position columns to each batch of tokenized rows."""

    def __init__(self, config: AuditConfig, role: Role, models: ModelPlan) -> None:
        from ezmia.backends import open_backend

        self.role = role
        self.backend, self.choice = open_backend(config, models, role)
        log.info("%s stage backend: %s", role, self.choice)

    def __call__(self, rows: pa.Table) -> pa.Table:
        return run_pass(rows, self.backend)

    def close(self) -> None:
        self.backend.close()


def run_pass(rows: pa.Table, backend: ScoringBackend) -> pa.Table:
    """``rows`` with the backend's per-position columns and its name in ``backend``."""
    check_token_range(rows, backend.vocab_size)
    columns = backend.pass_columns(rows.column("input_ids").to_pylist())
    for name, arrays in columns.items():
        rows = rows.append_column(name, pa.array(arrays, PASS_TYPES[name]))
    names = [backend.name] * rows.num_rows
    if "backend" in rows.column_names:
        before = rows.column("backend").to_pylist()
        names = [b if b == backend.name else f"{b}+{backend.name}" for b in before]
        rows = rows.drop_columns(["backend"])
    return rows.append_column("backend", pa.array(names, pa.string()))


def list_arrays(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A list column as one numpy array per row (views, no per-element Python objects)."""
    array = column.combine_chunks()
    values = np.asarray(array.values)  # the offsets index these (slices too)
    return [values[a:b] for a, b in itertools.pairwise(array.offsets.to_numpy())]


def score_rows(rows: pa.Table, include_text: bool) -> pa.Table:
    """Score rows that went through every model stage into the scores schema (without
    ``flagged``: ``add_flagged`` adds it to the scored rows in detection mode)."""
    passes = {
        name: list_arrays(rows.column(name)) for name in PASS_TYPES if name in rows.column_names
    }
    stats = stats_from_columns(passes)
    n_tokens = pc.list_value_length(rows.column("input_ids")).to_pylist()
    zlib_sizes = rows.column("zlib_size").to_pylist()
    scored = list(map(score_sequence, stats, n_tokens, zlib_sizes))
    labelled = "is_member" in rows.column_names
    schema = scores_schema(rows.schema.field("id").type, labelled, False, include_text)
    columns: dict = {name: [row[name] for row in scored] for name in scored[0]} if scored else {}
    columns["n_tokens"] = n_tokens
    columns["source_row"] = rows.column(ROW_INDEX)
    columns["backend"] = rows.column("backend")
    for name in ("id", "truncated", "text_sha256", "is_member", "text"):
        if name in schema.names:
            columns[name] = rows.column(name)
    return pa.table({f.name: columns.get(f.name, []) for f in schema}, schema=schema)


def calibrate(calibration: pa.Table, fpr: float) -> dict:
    """Detection's record from the calibration non-members' score columns: the EZ threshold
    that ``fpr`` of them exceed, and how many there were."""
    ez = calibration.column("ez_score").to_numpy()
    return {"fpr": fpr, "threshold": detection_threshold(ez, fpr), "n_calibration": len(ez)}


def add_flagged(scores: pa.Table, threshold: float | None) -> pa.Table:
    """Scored rows with ``flagged`` (EZ strictly above the detection ``threshold``) where the
    scores schema places it, before ``text``; unchanged without a threshold (not detection)."""
    if threshold is None:
        return scores
    flagged = pc.greater(scores.column("ez_score"), threshold)
    names = scores.column_names
    at = names.index("text") if "text" in names else len(names)
    return scores.add_column(at, pa.field("flagged", pa.bool_()), flagged)


def check_token_range(rows: pa.Table, vocab_size: int | None) -> None:
    """Refuse token ids outside ``0..vocab_size-1`` before they reach an embedding lookup (the
    planning check compares the tokenizer with the configs; this one sees the actual ids)."""
    if vocab_size is None:
        return
    sequences = rows.column("input_ids").combine_chunks()
    ids = pc.list_flatten(sequences)
    outside = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, vocab_size))
    if not pc.any(outside).as_py():  # None: no ids at all
        return
    first = pc.index(outside, True).as_py()
    row = rows.column(ROW_INDEX)[pc.list_parent_indices(sequences)[first].as_py()].as_py()
    bad = ids[first].as_py()
    raise ModelError(
        f"source row {row}: token id {bad} is outside the models' vocabulary (ids 0 to "
        f"{vocab_size - 1}): the tokenizer does not match the models; use the tokenizer they "
        "were trained with"
    )


def combined_choice(choices: dict[str, dict]) -> dict:
    """One backend record for the summary from each model stage's ``{"name", "reason"}``: the
    stage's own record when there is one stage, else the names joined and each reason by its
    stage."""
    if len(choices) == 1:
        return next(iter(choices.values()))
    names = list(dict.fromkeys(c["name"] for c in choices.values()))
    return {
        "name": "+".join(names),
        "reason": "; ".join(f"{role} stage: {c['reason']}" for role, c in choices.items()),
        "stages": choices,
    }
