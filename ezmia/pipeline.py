"""The Ray engine, in the shape of Ray Data batch inference:

    fragments -> read (CPU tasks) -> tokenize (CPU tasks)
              -> score (actor pool holding target and reference) -> write parts (OUT/scores/)

The driver then gets the score columns only (never texts) for the summary and report.
Scoring actors are restarted by Ray Data when they die and their batches retried; parts are
written (one task per block, where the block lives, with the audit's S3 encryption) only
after every block is materialized, so each input row appears exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import pyarrow as pa

from ezmia import outputs, storage
from ezmia.audit import AuditPlan, open_backend, resolve_models
from ezmia.backends import BackendOptions, why_not_vllm
from ezmia.config import AuditConfig
from ezmia.io import Columns, Fragment, normalize, read_fragment
from ezmia.scoring import score_tokenized, tokenize_rows
from ezmia.text import load_tokenizer


def _read(batch: dict, columns: Columns) -> pa.Table:
    """Read the fragments named in a batch of ``Fragment`` fields."""
    fragments = [Fragment(**row) for row in pa.table(batch).to_pylist()]
    return pa.concat_tables(
        [normalize(read_fragment(f, columns), columns, f.uri) for f in fragments],
        promote_options="permissive",
    )


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(Path(path))


def _tokenize(rows: pa.Table, tokenizer_path: str, max_length: int) -> pa.Table:
    return tokenize_rows(rows, _tokenizer(tokenizer_path), max_length)


def _write_part(table: pa.Table, out: str, encryption: storage.Encryption, part: int) -> None:
    """Write one scores part (a retried task rewrites the same part name)."""
    outputs.write_scores(out, table, encryption, part=part)


class BlockScorer:
    """A scoring actor: loads the models once (resolving them on its own node), then scores
    each tokenized batch."""

    def __init__(self, config: AuditConfig, threshold: float | None) -> None:
        models = resolve_models(config)
        self.backend, choice = open_backend(config, models)
        logging.getLogger(__name__).warning("scoring actor backend: %s", choice)
        self.include_text = config.include_text
        self.threshold = threshold

    def __call__(self, rows: pa.Table) -> pa.Table:
        return score_tokenized(rows, self.backend, self.include_text, self.threshold)


class RayEngine:
    """Scores on a Ray cluster (``RAY_ADDRESS``, ``config.ray.address``, or a local one)."""

    def __init__(self, plan: AuditPlan) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=plan.config.ray.address, log_to_driver=True)
        self.plan = plan
        self.backend_choice: dict = {}

    def score(
        self, fragments: list[Fragment], output: outputs.Output | None, threshold: float | None
    ) -> pa.Table:
        import ray

        config = self.plan.config
        options = config.ray
        blocks = max(1, math.ceil(sum(f.num_rows for f in fragments) / options.rows_per_block))
        ds = (
            ray.data.from_items([dataclasses.asdict(f) for f in fragments])
            .map_batches(
                _read,
                fn_kwargs={"columns": self.plan.columns},
                batch_size=1,
                batch_format="pyarrow",
            )
            .repartition(blocks)
            .map_batches(
                _tokenize,
                fn_kwargs={
                    "tokenizer_path": str(self.plan.models.tokenizer),
                    "max_length": config.max_length,
                },
                batch_format="pyarrow",
            )
            .map_batches(
                BlockScorer,
                fn_constructor_kwargs={"config": config, "threshold": threshold},
                compute=ray.data.ActorPoolStrategy(
                    min_size=options.min_actors,
                    max_size=options.max_actors,
                ),
                num_gpus=options.gpus_per_actor,
                num_cpus=options.cpus_per_actor,
                batch_size=options.rows_per_block,
                batch_format="pyarrow",
            )
            .materialize()
        )
        if output is not None:
            write = ray.remote(num_cpus=0.25)(_write_part)
            parts = ds.to_arrow_refs()  # each block is written where it lives, not via the driver
            output.claim(*(outputs.part_name(i) for i in range(len(parts))))
            ray.get(
                [write.remote(ref, output.uri, output.encryption, i) for i, ref in enumerate(parts)]
            )
        columns = [c for c in ds.schema().names if c != "text"]
        scores = pa.concat_tables(ray.get(ds.select_columns(columns).to_arrow_refs()))
        self.backend_choice = self._choice(scores)
        return scores.sort_by("source_row")

    def _choice(self, scores: pa.Table) -> dict:
        """Which backends the actors used (per row in the ``backend`` column) and why."""
        used = sorted(set(scores.column("backend").to_pylist()))
        reason = why_not_vllm(self.plan.models, BackendOptions.from_config(self.plan.config))
        return {"name": "+".join(used), "reason": reason or "vLLM, canary-checked per actor"}

    def close(self) -> None:
        """The cluster stays up; actors are released with the dataset."""
