"""The Ray engine, in the shape of Ray Data batch inference:

    fragments -> read (CPU tasks) -> tokenize (CPU tasks)
              -> target stage (actor pool) -> reference stage (actor pool)
              -> score (CPU tasks) -> write parts (CPU tasks, OUT/scores/)

Each model stage (``scoring.model_stages``) is its own actor pool, with the GPUs
``cluster.stage_gpus`` gives it. Every actor resolves its models from their URIs on its own
node (downloaded once per node under a file lock); tokenize tasks fetch only the tokenizer's
files.

Streaming: each part is written as its rows finish, named after the first source row of its
slice (``rows_per_block`` rows of one fragment, planned and claimed in the manifest on the
driver before anything runs), so a retried block overwrites its own part. The write tasks
return one small row per part; the driver then commits: it reads the parts' score columns
back (never texts) and checks that every source row is there exactly once, before the audit
writes its summary and ``_SUCCESS``. Object store and driver memory are bounded by the blocks
in flight and the score columns.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ezmia.backends.base import Role
from ezmia.config import AuditConfig
from ezmia.data import outputs, storage
from ezmia.data.datasets import Columns, Fragment, normalize, read_fragment
from ezmia.data.text import load_tokenizer
from ezmia.engines.cluster import cluster_error, connect
from ezmia.engines.scoring import (
    ModelStage,
    add_flagged,
    calibrate,
    model_stages,
    score_rows,
    stage_models,
    tokenize_rows,
)
from ezmia.errors import OutputError
from ezmia.plan.fetch import resolve_tokenizer_dir
from ezmia.plan.models import ModelPlan
from ezmia.plan.planner import AuditPlan

SLICE = "__slice"
"""The first source row of a row's slice: the part it is written to."""
CALIBRATION = "__calibration"
"""Detection: whether a row is a calibration non-member (scored, never written)."""

log = logging.getLogger(__name__)


def plan_slices(fragments: list[Fragment], rows_per_block: int) -> list[int]:
    """The first source row of every slice: ``rows_per_block`` rows of one fragment (its last
    slice shorter), in source order. Each slice is written as one part."""
    return [
        start for f in fragments for start in range(f.offset, f.offset + f.num_rows, rows_per_block)
    ]


def _read_slices(batch: dict, columns: Columns, rows_per_block: int) -> Iterator[pa.Table]:
    """Read one fragment (a batch of one ``Fragment``'s fields) and yield it slice by slice,
    each row with its slice's first source row (``SLICE``). Ray Data builds blocks from whole
    yields (it cuts a block only beyond 1.5 x its target size, far above one slice), so a
    slice stays in one block and is written as one part."""
    (fragment,) = (Fragment(**row) for row in pa.table(batch).to_pylist())
    rows = normalize(read_fragment(fragment, columns), columns, fragment.uri)
    for offset in range(0, rows.num_rows, rows_per_block):
        part = rows.slice(offset, rows_per_block)
        start = fragment.offset + offset
        yield part.append_column(SLICE, pa.array([start] * part.num_rows, pa.int64()))


@functools.lru_cache(maxsize=4)
def _tokenizer(uri: str, cache_dir: str | None):
    return load_tokenizer(resolve_tokenizer_dir(uri, cache_dir))


def _tokenize(rows: pa.Table, tokenizer_uri: str, cache_dir: str | None, max_length: int):
    """Tokenize with the tokenizer fetched from its URI on this node (its small files only)."""
    return tokenize_rows(rows, _tokenizer(tokenizer_uri, cache_dir), max_length)


def _tag(rows: pa.Table, calibration: bool) -> pa.Table:
    return rows.append_column(CALIBRATION, pa.array([calibration] * rows.num_rows, pa.bool_()))


def _score(rows: pa.Table, include_text: bool) -> pa.Table:
    """The score stage: every score from the model stages' columns, keeping ``SLICE`` (and
    ``CALIBRATION`` in detection)."""
    scores = score_rows(rows, include_text)
    for name in (SLICE, CALIBRATION):
        if name in rows.column_names:
            scores = scores.append_column(name, rows.column(name))
    return scores


def _write_parts(
    rows: pa.Table, out: str, encryption: storage.Encryption, threshold: float | None
) -> pa.Table:
    """Write each slice's rows as its part, ``flagged`` added in detection mode (a retried
    block rewrites the same names), and return one small row per part: its first source row
    and row count."""
    starts = sorted(set(rows.column(SLICE).to_pylist()))
    counts = []
    for start in starts:
        part = rows.filter(pc.equal(rows.column(SLICE), start))
        part = part.drop_columns([c for c in (SLICE, CALIBRATION) if c in part.column_names])
        part = add_flagged(part, threshold)
        outputs.write_scores(out, part, encryption, part=start)
        counts.append(part.num_rows)
    return pa.table({"part": pa.array(starts, pa.int64()), "rows": pa.array(counts, pa.int64())})


class _NodeModelStage(ModelStage):
    """A model stage on a Ray actor: the driver's plan, its models resolved on this node."""

    role: Role

    def __init__(self, config: AuditConfig, models: ModelPlan) -> None:
        super().__init__(config, self.role, stage_models(config, models, self.role))


class TargetModelStage(_NodeModelStage):
    """The target's model stage (one actor of its pool)."""

    role = "target"


class ReferenceModelStage(_NodeModelStage):
    """The reference's model stage (one actor of its pool)."""

    role = "reference"


class SharedBaseModelStage(_NodeModelStage):
    """A LoRA target's one model stage: both passes on one copy of the base."""

    role = "both"


STAGE_ACTORS: dict[str, type[_NodeModelStage]] = {
    c.role: c for c in (TargetModelStage, ReferenceModelStage, SharedBaseModelStage)
}


class RayEngine:
    """Scores on the Ray cluster ``connect`` joined and checked; an error raised there
    reaches the user as one line (``cluster_error``)."""

    def __init__(self, plan: AuditPlan) -> None:
        self.gpus = connect(plan.config)  # checked again; GPUs per actor of each model stage
        self.plan = plan
        self.backend_choice: dict = {}

    def score(self, output: outputs.Output) -> tuple[pa.Table, dict | None]:
        """The plan's fragments, written to ``output``; in detection, scored in one pass with
        the calibration rows, so each model stage's actors load their models once."""
        from ray.exceptions import RayError

        try:
            if self.plan.calibration:
                scores, detection = self._detect(output)
            else:
                scored = self._scored(self._read(self.plan.fragments))
                scores, detection = self._write(scored, self.plan.fragments, output, None), None
        except RayError as err:
            raise cluster_error(err) from err
        used = sorted(set(scores.column("backend").to_pylist()))  # the backends actors chose
        roles = ", ".join(model_stages(self.plan.models.target_is_adapter))
        reason = f"model stages {roles} on Ray actors; each backend chosen per actor"
        self.backend_choice = {"name": "+".join(used), "reason": reason}
        return scores, detection

    def _read(self, fragments: list[Fragment]):
        """The fragments' rows in slices, as a lazy Ray dataset."""
        import ray

        rows_per_block = self.plan.config.ray.rows_per_block
        return (
            ray.data.from_items(
                [dataclasses.asdict(f) for f in fragments], override_num_blocks=len(fragments)
            )
            .map_batches(
                _read_slices,
                fn_kwargs={"columns": self.plan.columns, "rows_per_block": rows_per_block},
                batch_size=1,
                batch_format="pyarrow",
            )
            .repartition(target_num_rows_per_block=rows_per_block)
        )

    def _scored(self, ds):
        """tokenize -> model stages -> score over a dataset of rows."""
        import ray

        config, models = self.plan.config, self.plan.models
        options = config.ray
        ds = ds.map_batches(
            _tokenize,
            fn_kwargs={
                "tokenizer_uri": models.sources["tokenizer"],
                "cache_dir": config.cache_dir,
                "max_length": config.max_length,
            },
            batch_format="pyarrow",
        )
        for role in model_stages(models.target_is_adapter):
            ds = ds.map_batches(
                STAGE_ACTORS[role],
                fn_constructor_kwargs={"config": config, "models": models},
                compute=ray.data.ActorPoolStrategy(
                    min_size=options.min_actors, max_size=options.max_actors
                ),
                num_gpus=self.gpus[role],
                num_cpus=options.cpus_per_actor,
                batch_size=options.rows_per_block,
                batch_format="pyarrow",
            )
        return ds.map_batches(
            _score,
            fn_kwargs={"include_text": config.include_text},
            batch_format="pyarrow",
            num_cpus=0.25,
        )

    def _detect(self, output: outputs.Output) -> tuple[pa.Table, dict]:
        """Calibration and candidate rows through the stages together; the candidates' scored
        blocks wait in the object store until the calibration rows give the threshold, then
        are written with ``flagged``."""
        import ray

        plan = self.plan
        calibration_rows, candidate_rows = (
            self._read(fragments).map_batches(
                _tag, fn_kwargs={"calibration": flag}, batch_format="pyarrow"
            )
            for fragments, flag in ((plan.calibration, True), (plan.fragments, False))
        )
        total = sum(f.num_rows for f in plan.calibration + plan.fragments)
        batches = self._scored(calibration_rows.union(candidate_rows)).iter_batches(
            batch_size=None, batch_format="pyarrow"
        )
        calibration, candidates = [], []
        for batch in _progress(batches, total, len, "scoring"):
            rows = batch.column(CALIBRATION)
            own = [c for c in ("text", SLICE, CALIBRATION) if c in batch.column_names]
            calibration.append(batch.filter(rows).drop_columns(own))
            if not pc.all(rows).as_py():
                candidates.append(ray.put(batch.filter(pc.invert(rows))))
        detection = calibrate(pa.concat_tables(calibration), plan.config.fpr)
        blocks = ray.data.from_arrow_refs(candidates)
        written = self._write(blocks, plan.fragments, output, detection["threshold"], "writing")
        return written, detection

    def _write(
        self,
        ds,
        fragments: list[Fragment],
        output: outputs.Output,
        threshold: float | None,
        stage: str = "scoring",
    ) -> pa.Table:
        """Write the scored dataset's slices as parts (``flagged`` with a threshold), then
        check them (``commit``) and return their score columns. Progress is logged as
        ``stage``: "scoring" when the rows are scored as they are written."""
        slices = plan_slices(fragments, self.plan.config.ray.rows_per_block)
        output.claim(*(outputs.part_name(start) for start in slices))
        written = ds.map_batches(
            _write_parts,
            fn_kwargs={"out": output.uri, "encryption": output.encryption, "threshold": threshold},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=0.25,
        )
        reported = {}
        batches = written.iter_batches(batch_format="pyarrow")
        total = sum(f.num_rows for f in fragments)
        rows_of = lambda b: pc.sum(b["rows"]).as_py() or 0  # noqa: E731
        for batch in _progress(batches, total, rows_of, stage):
            reported.update(zip(batch["part"].to_pylist(), batch["rows"].to_pylist(), strict=True))
        return commit(output, fragments, slices, reported)

    def close(self) -> None:
        """The cluster stays up; actors are released with the dataset."""


def _progress(
    batches: Iterable[pa.Table], total: int, rows_of: Callable[[pa.Table], int], stage: str
) -> Iterator[pa.Table]:
    """Pass ``batches`` through, logging ``stage``'s progress at about every tenth of the
    ``total`` rows (``rows_of``: the rows a batch stands for)."""
    done, next_at = 0, 0
    for batch in batches:
        yield batch
        done += rows_of(batch)
        if done >= next_at:
            log.warning("%s: %d of %d rows (%d%%)", stage, done, total, 100 * done // max(total, 1))
            next_at = done + max(1, total // 10)


def commit(
    output: outputs.Output, fragments: list[Fragment], slices: list[int], reported: dict[int, int]
) -> pa.Table:
    """Check the written parts against the expected rows and return their score columns (no
    texts), in source order: every slice's part was written, and every source row of the
    fragments is in the parts exactly once."""
    missing = [start for start in slices if start not in reported]
    if missing:
        raise OutputError(
            f"--out {output.uri}: {len(missing)} scores part(s) were not written (e.g. "
            f"{outputs.part_name(missing[0])}); rerun the audit"
        )
    tables = []
    for start in slices:
        data = storage.read_bytes(storage.join(output.uri, outputs.part_name(start)))
        part = pq.ParquetFile(io.BytesIO(data))
        tables.append(part.read(columns=[n for n in part.schema_arrow.names if n != "text"]))
    scores = pa.concat_tables(tables, promote_options="permissive").sort_by("source_row")
    expected = np.sort(
        np.concatenate([np.arange(f.offset, f.offset + f.num_rows) for f in fragments])
    )
    found = scores.column("source_row").to_numpy()
    if not np.array_equal(found, expected):
        twice = found[:-1][found[1:] == found[:-1]]
        lost = np.setdiff1d(expected, found)
        what = f"source row {twice[0]} twice" if len(twice) else f"no source row {lost[0]}"
        raise OutputError(
            f"--out {output.uri}: the written scores parts hold {what} ({len(found)} rows for "
            f"{len(expected)} expected); a block was split or lost on the cluster: rerun the "
            "audit"
        )
    return scores
