"""The Ray engine, in the shape of Ray Data batch inference:

    fragments -> read (CPU tasks) -> tokenize (CPU tasks)
              -> target stage (actor pool) -> reference stage (actor pool)
              -> score (CPU tasks) -> write parts (CPU tasks, OUT/scores/)

Each model stage is its own actor pool with its own GPUs (``gpus_per_actor``, by default the
stage's tensor-parallel size on a cluster with GPUs); a LoRA target keeps both passes in one
stage on one copy of its base (``scoring.model_stages``). Stages pass only compact
per-position list columns. Every actor resolves its models from their URIs on its own node
(downloaded once per node under a file lock); tokenize tasks fetch only the tokenizer's files.

Streaming: each part is written as its rows finish, named after the first source row of its
slice (``rows_per_block`` rows of one fragment, planned and claimed in the manifest on the
driver before anything runs), so a retried block overwrites its own part. The write tasks
return one small row per part; the driver then commits: it reads the parts' score columns
back (never texts) and checks that every source row is there exactly once, before the audit
writes its summary and ``_SUCCESS``. Object store and driver memory are bounded by the blocks
in flight and the score columns.

Before any data is read, ``connect`` joins the cluster and refuses what it cannot run: a job
server's http address, an address nothing answers on, actors no alive node or autoscaling node
type can host, more ``min_actors`` than fit at once, a ``--device`` the actors will not see.
An error raised on the cluster reaches the user as one line (``cluster_error``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ezmia import errors
from ezmia.backends import device_count, parse_device
from ezmia.config import AuditConfig, RayOptions
from ezmia.data import outputs, storage
from ezmia.data.datasets import ROW_INDEX, Columns, Fragment, normalize, read_fragment
from ezmia.data.text import load_tokenizer
from ezmia.engines.scoring import (
    ModelStage,
    add_flagged,
    calibrate,
    combined_choice,
    model_stages,
    score_rows,
    tokenize_rows,
)
from ezmia.errors import EzmiaError, InputError, OutputError
from ezmia.plan.models import adapter_base, resolve_tokenizer_dir
from ezmia.plan.planner import AuditPlan, job_server_address

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


def _read(batch: dict, columns: Columns) -> pa.Table:
    """Read the fragments named in a batch of ``Fragment`` fields."""
    fragments = [Fragment(**row) for row in pa.table(batch).to_pylist()]
    return pa.concat_tables(
        [normalize(read_fragment(f, columns), columns, f.uri) for f in fragments],
        promote_options="permissive",
    )


def _read_slices(batch: dict, columns: Columns, rows_per_block: int) -> Iterator[pa.Table]:
    """Read one fragment (a batch of one ``Fragment``'s fields) and yield it slice by slice,
    each row with its slice's first source row (``SLICE``). Ray Data builds blocks from whole
    yields (it cuts a block only beyond 1.5 x its target size, far above one slice), so a
    slice stays in one block and is written as one part."""
    rows = _read(batch, columns)
    first = pc.min(rows.column(ROW_INDEX)).as_py() if rows.num_rows else 0
    for offset in range(0, rows.num_rows, rows_per_block):
        part = rows.slice(offset, rows_per_block)
        yield part.append_column(SLICE, pa.array([first + offset] * part.num_rows, pa.int64()))


@functools.lru_cache(maxsize=4)
def _tokenizer(uri: str, cache_dir: str | None):
    return load_tokenizer(resolve_tokenizer_dir(uri, Path(cache_dir) if cache_dir else None))


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


class TargetModelStage(ModelStage):
    """The target's model stage (one actor of its pool)."""

    def __init__(self, config: AuditConfig) -> None:
        super().__init__(config, "target")


class ReferenceModelStage(ModelStage):
    """The reference's model stage (one actor of its pool)."""

    def __init__(self, config: AuditConfig) -> None:
        super().__init__(config, "reference")


class SharedBaseModelStage(ModelStage):
    """A LoRA target's one model stage: both passes on one copy of the base."""

    def __init__(self, config: AuditConfig) -> None:
        super().__init__(config, "both")


STAGE_ACTORS: dict[str, type[ModelStage]] = {
    "target": TargetModelStage,
    "reference": ReferenceModelStage,
    "both": SharedBaseModelStage,
}


PROBE_TIMEOUT_S = 10.0
"""How long a cluster address may take to accept a TCP connection (``ray.init`` itself
retries an address nothing answers on for minutes)."""

RESOURCE_STEP = 0.0001
"""The finest fraction of a CPU or GPU Ray grants."""

_HOST_PORT = re.compile(r"^(?:ray://)?\[?(?P<host>[^\]/]+?)\]?:(?P<port>\d+)/?$")


def connect(config: AuditConfig) -> None:
    """Join the Ray cluster (``--ray-address``, else ``RAY_ADDRESS``, else a new local one)
    and refuse an audit its nodes cannot run, before any model or data is read."""
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if config.ray.gpus_per_actor is not None or not (address or ray.is_initialized()):
        # known before joining: asked for, or a new local instance has this machine's GPUs
        for gpus in set(stage_gpus(config, device_count("cuda") > 0).values()):
            check_request(config.ray, config.device, gpus)
    if not ray.is_initialized():
        flag = (
            f"--ray-address {address}"
            if config.ray.address
            else f"RAY_ADDRESS={address}"
            if address
            else "a new local Ray instance (no --ray-address or RAY_ADDRESS)"
        )
        if address and job_server_address(address):
            raise InputError(
                f"{flag}: this is a Ray job server's address (the dashboard's, which "
                "`ray job submit` takes), not a cluster to join: pass --ray-address HOST:6379 "
                "(the head's GCS address), submit jobs/audit.py with `ray job submit`, or use "
                "--engine local"
            )
        if address:
            _probe(address, flag)
        cwd = os.getcwd()
        try:
            ray.init(address=address, log_to_driver=True)
            _reenter(cwd)
        except Exception as err:  # Ray raises ConnectionError, ValueError, RuntimeError...
            reason = " ".join(str(err).split())[:300]
            raise InputError(
                f"{flag}: cannot join the Ray cluster ({reason}); check the address "
                "and that the cluster is up"
            ) from err
    quiet_ray_data()
    nodes, types = ray.nodes(), node_types()
    for gpus in sorted(set(stage_gpus(config, _has_gpus(nodes, types)).values())):
        if config.ray.gpus_per_actor is None:
            check_request(config.ray, config.device, gpus)
        check_resources(config.ray, nodes, types, gpus)


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-operator INFO lines only with ``-v`` (ezmia logs at
    INFO): otherwise ezmia's own progress lines are what a job's log shows."""
    import ray.data

    verbose = logging.getLogger("ezmia").isEnabledFor(logging.INFO)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)


def node_types() -> list[tuple[float, float]]:
    """``(CPU, GPU)`` of each node type an autoscaler may start (its cluster config in the GCS,
    ``ray._private.state``, as Ray Data's own autoscaler reads it), including types scaled to
    zero; empty on a cluster without an autoscaler or where Ray's private API moved."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # private API: no autoscaler information then
        return []
    if config is None:
        return []
    return [
        (float(g.resources.get("CPU", 0.0)), float(g.resources.get("GPU", 0.0)))
        for g in config.node_group_configs
        if g.max_count != 0
    ]


def _has_gpus(nodes: list[dict], types: list[tuple[float, float]]) -> bool:
    alive = [n["Resources"].get("GPU", 0.0) for n in nodes if n.get("Alive")]
    return any(alive) or any(gpus for _, gpus in types)


def stage_gpus(config: AuditConfig, cluster_has_gpus: bool) -> dict[str, float]:
    """GPUs per actor of each model stage: ``--ray-gpus-per-actor`` when given, else the
    stage's tensor-parallel size on a cluster with GPUs (alive or an autoscaling node type),
    else 0."""
    stages = model_stages(_is_adapter_config(config))
    if config.ray.gpus_per_actor is not None:
        return {role: config.ray.gpus_per_actor for role in stages}
    if not cluster_has_gpus:
        return {role: 0.0 for role in stages}
    vllm = config.vllm
    tp = {
        "target": vllm.tensor_parallel_size,
        "both": vllm.tensor_parallel_size,
        "reference": vllm.reference_tensor_parallel_size or vllm.tensor_parallel_size,
    }
    return {role: float(tp[role]) for role in stages}


def _is_adapter_config(config: AuditConfig) -> bool:
    """Whether the target is an adapter, from its ``adapter_config.json`` (a small file)."""
    if storage.is_s3(config.target):
        return storage.exists(storage.join(config.target.rstrip("/"), "adapter_config.json"))
    return (Path(config.target).expanduser() / "adapter_config.json").exists()


def _noop() -> None:
    """A task that needs only the job's runtime environment."""


def _reenter(cwd: str) -> None:
    """Keep this driver in a working folder that exists. In a Ray job whose runtime env has a
    ``working_dir``, Ray 2.60 extracts that folder afresh while installing the job's
    environment on this node (after ``ray.init`` returns), deleting the copy this process runs
    in: ``os.getcwd()`` (which transformers calls on import) and relative paths then fail.
    Wait for the installation (a task pinned to this node needs it), then enter the fresh
    copy."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    if not (context.runtime_env or {}).get("working_dir"):
        return
    here = NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False)
    ray.get(ray.remote(_noop).options(num_cpus=0, scheduling_strategy=here).remote())
    try:
        moved = not os.path.samefile(".", cwd)
    except FileNotFoundError:
        moved = True
    if moved:
        os.chdir(cwd)


def _probe(address: str, flag: str) -> None:
    """Refuse at once a ``host:port`` address (or the one ``auto`` finds: the last cluster
    started on this machine) that accepts no TCP connection."""
    if address.strip() == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # none found, or Ray's private API moved: ray.init says why
            return
    match = _HOST_PORT.match(address.strip())
    if match is None:
        return  # "local" or a form Ray resolves itself
    try:
        socket.create_connection((match["host"], int(match["port"])), PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise InputError(
            f"{flag}: no Ray cluster answers there ({err.strerror or err}); start the "
            "cluster or fix the address (the head's GCS address, HOST:6379)"
        ) from err


def check_request(options: RayOptions, device: str, gpus: float) -> None:
    """Refuse GPU requests (``gpus`` per actor) Ray cannot grant and a ``--device`` the model
    stages' actors will not see (no cluster needed)."""
    for flag, value in (("cpus", options.cpus_per_actor), ("gpus", gpus)):
        if 0 < value < RESOURCE_STEP:
            raise InputError(
                f"--ray-{flag}-per-actor {value:g}: Ray counts resources in steps of "
                f"{RESOURCE_STEP:g}; ask for {RESOURCE_STEP:g} or more"
            )
    if gpus > 1 and not float(gpus).is_integer():
        raise InputError(
            f"--ray-gpus-per-actor {gpus:g}: Ray grants more than one GPU only in whole GPUs; "
            "use a whole number, or a fraction below 1 to share a GPU"
        )
    _check_actor_device(device, gpus)


def check_resources(
    options: RayOptions,
    nodes: list[dict],
    types: Iterable[tuple[float, float]] = (),
    gpus: float | None = None,
) -> None:
    """Refuse model-stage actors (``gpus`` each, default ``--ray-gpus-per-actor``) that no
    alive node and no autoscaling node type (``types``: ``(CPU, GPU)``, ``node_types()``) can
    host, and more ``min_actors`` than the alive nodes host at once when no node type could
    add more. ``nodes`` is ``ray.nodes()``."""
    cpus = options.cpus_per_actor
    gpus = (options.gpus_per_actor or 0.0) if gpus is None else gpus
    shapes = [
        (n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in nodes
        if n.get("Alive")
    ]
    types = list(types)
    if any(_actors_per_node(shape, cpus, gpus) for shape in types):
        return  # the autoscaler can start a node that hosts it (and more of them)
    counted = _describe_nodes(shapes, types)
    fits = [_actors_per_node(shape, cpus, gpus) for shape in shapes]
    if not any(fits):
        most_cpus = max((c for c, _ in shapes), default=0.0)
        most_gpus = max((g for _, g in shapes), default=0.0)
        if gpus and not most_gpus:
            raise InputError(
                f"--ray-gpus-per-actor {gpus:g}: no node of the Ray cluster has a GPU ({counted}); "
                "use --ray-gpus-per-actor 0 to score on CPUs, or add nodes with GPUs"
            )
        if most_gpus < gpus:
            raise InputError(
                f"--ray-gpus-per-actor {gpus:g}: no node of the Ray cluster has that many GPUs, "
                f"the most is {most_gpus:g} ({counted}); use --ray-gpus-per-actor {most_gpus:g} "
                "or less"
            )
        if most_cpus < cpus:
            raise InputError(
                f"--ray-cpus-per-actor {cpus:g}: no node of the Ray cluster has that many CPUs "
                f"({counted}); use --ray-cpus-per-actor {most_cpus:g} or less"
            )
        raise InputError(
            f"--ray-cpus-per-actor {cpus:g} with --ray-gpus-per-actor {gpus:g}: no node of the "
            f"Ray cluster has both ({counted}); ask for fewer CPUs per actor or add such nodes"
        )
    if sum(fits) < options.min_actors:
        raise InputError(
            f"--ray-min-actors {options.min_actors}: the Ray cluster hosts at most {sum(fits)} "
            f"scoring actors at once ({cpus:g} CPU and {gpus:g} GPU each; {counted}); use "
            f"--ray-min-actors {sum(fits)} or less, or smaller actors"
        )


def _actors_per_node(shape: tuple[float, float], cpus: float, gpus: float) -> int:
    """How many actors of ``cpus`` and ``gpus`` a node of ``(CPU, GPU)`` hosts at once."""
    counts = [math.floor(shape[0] / cpus + 1e-9)]
    if gpus:
        counts.append(math.floor(shape[1] / gpus + 1e-9))
    return min(counts)


def _describe_nodes(shapes: list[tuple[float, float]], types: list[tuple[float, float]]) -> str:
    """``"alive nodes now: 2 x (2 CPU, 0 GPU)"``, plus the autoscaling node types (or that the
    check cannot see any)."""
    groups = Counter(shapes)
    listed = ", ".join(f"{n} x ({c:g} CPU, {g:g} GPU)" for (c, g), n in sorted(groups.items()))
    if not types:
        return (
            f"alive nodes now: {listed or 'none'}; nodes an autoscaler has not started are not "
            "counted"
        )
    kinds = ", ".join(f"({c:g} CPU, {g:g} GPU)" for c, g in sorted(set(types)))
    return f"alive nodes now: {listed or 'none'}; autoscaling node types: {kinds}"


def _check_actor_device(device: str, gpus: float) -> None:
    """A ``--device`` a scoring actor can use: Ray hides GPUs from actors that ask for none
    and numbers an actor's GPUs from ``cuda:0``."""
    if device in ("auto", "cpu"):
        return
    parsed = parse_device(device)
    if parsed.type != "cuda":
        raise InputError(
            f"--device {device}: Ray gives scoring actors CPUs and CUDA GPUs only; use --device "
            "auto, cpu or cuda (with --ray-gpus-per-actor), or --engine local"
        )
    if not gpus:
        raise InputError(
            f"--device {device}: the scoring actors ask for no GPU (--ray-gpus-per-actor 0), so "
            "Ray hides CUDA from them; pass --ray-gpus-per-actor 1 (or a fraction to share a "
            "GPU), or --device auto"
        )
    visible = max(1, math.floor(gpus))
    if parsed.index is not None and parsed.index >= visible:
        raise InputError(
            f"--device {device}: each scoring actor sees {visible} GPU"
            f"{'s' if visible > 1 else ''} (--ray-gpus-per-actor {gpus:g}), numbered from "
            "cuda:0 on its node; use --device cuda"
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^(?P<name>[A-Za-z_][\w.]*): (?P<message>.*)$")


def cluster_error(err: Exception) -> EzmiaError:
    """One line for an error raised on the cluster (Ray wraps it in pages of traceback): an
    ezmia error raised by a task or actor keeps its class and message; any other error is
    named by the last error line of its traceback that is not Ray's own wrapper, with where to
    look."""
    lines = _ANSI.sub("", str(err)).splitlines()
    raised = [(i, m) for i, line in enumerate(lines) if (m := _RAISED.match(line))]
    for i, match in reversed(raised):
        module, _, name = match["name"].rpartition(".")
        kind = getattr(errors, name, None) if module == "ezmia.errors" else None
        if isinstance(kind, type) and issubclass(kind, EzmiaError):
            rest = lines[i + 1 :]
            rest = rest[: rest.index("")] if "" in rest else rest  # a chained error follows
            return kind(" ".join(" ".join([match["message"], *rest]).split()))
    own = [m for _, m in raised if not m["name"].startswith("ray.")]  # not Ray's wrappers
    if raised:
        match = (own or [m for _, m in raised])[-1]
        what = f"{match['name'].rpartition('.')[2]}: {match['message'].strip()}"
    else:
        first = next((line.strip() for line in lines if line.strip()), "")
        what = f"{type(err).__name__}: {first}"
    return EzmiaError(
        f"the Ray audit failed on the cluster ({what[:400]}); see the scoring actors' logs (Ray "
        "dashboard, or `ray logs`), fix the cause and rerun"
    )


class RayEngine:
    """Scores on the Ray cluster ``connect`` joined."""

    def __init__(self, plan: AuditPlan) -> None:
        connect(plan.config)  # a no-op check when planning already joined
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
                fragments = self.plan.fragments
                scored = self._scored(self._read(fragments))
                scores, detection = self._write(scored, fragments, output, None), None
        except RayError as err:
            raise cluster_error(err) from err
        self.backend_choice = self._choice(scores)
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
                "tokenizer_uri": tokenizer_uri(self.plan),
                "cache_dir": config.cache_dir,
                "max_length": config.max_length,
            },
            batch_format="pyarrow",
        )
        gpus = stage_gpus(config, _has_gpus(ray.nodes(), node_types()))
        for role in model_stages(models.target_is_adapter):
            ds = ds.map_batches(
                STAGE_ACTORS[role],
                fn_constructor_kwargs={"config": config},
                compute=ray.data.ActorPoolStrategy(
                    min_size=options.min_actors, max_size=options.max_actors
                ),
                num_gpus=gpus[role],
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
        for batch in _progress(batches, total, len):
            rows = batch.column(CALIBRATION)
            own = [c for c in ("text", SLICE, CALIBRATION) if c in batch.column_names]
            calibration.append(batch.filter(rows).drop_columns(own))
            if not pc.all(rows).as_py():
                candidates.append(ray.put(batch.filter(pc.invert(rows))))
        detection = calibrate(pa.concat_tables(calibration), plan.config.fpr)
        blocks = ray.data.from_arrow_refs(candidates)
        return self._write(blocks, plan.fragments, output, detection["threshold"]), detection

    def _write(
        self, ds, fragments: list[Fragment], output: outputs.Output, threshold: float | None
    ) -> pa.Table:
        """Write the scored dataset's slices as parts (``flagged`` with a threshold), then
        check them (``commit``) and return their score columns."""
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
        for batch in _progress(batches, total, lambda b: pc.sum(b["rows"]).as_py() or 0):
            reported.update(zip(batch["part"].to_pylist(), batch["rows"].to_pylist(), strict=True))
        return commit(output, fragments, slices, reported)

    def _choice(self, scores: pa.Table) -> dict:
        """Which backends the stages used (per row in the ``backend`` column)."""
        used = sorted(set(scores.column("backend").to_pylist()))
        roles = model_stages(self.plan.models.target_is_adapter)
        reason = f"model stages {', '.join(roles)} on Ray actors; each backend chosen per actor"
        return combined_choice({"ray": {"name": "+".join(used), "reason": reason}})

    def close(self) -> None:
        """The cluster stays up; actors are released with the dataset."""


def tokenizer_uri(plan: AuditPlan) -> str:
    """The URI of the model whose tokenizer the audit uses (the target's, else the
    reference's), for tokenize tasks to fetch on their own nodes."""
    config, models = plan.config, plan.models
    if models.tokenizer == models.target:
        return config.target
    return config.reference or adapter_base(models.target)


def _progress(
    batches: Iterable[pa.Table], total: int, rows_of: Callable[[pa.Table], int]
) -> Iterator[pa.Table]:
    """Pass ``batches`` through, logging the scoring progress at about every tenth of the
    ``total`` rows (``rows_of``: the rows a batch stands for)."""
    done, next_at = 0, 0
    for batch in batches:
        yield batch
        done += rows_of(batch)
        if done >= next_at:
            log.warning("scoring: %d of %d rows (%d%%)", done, total, 100 * done // max(total, 1))
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
        schema = pq.read_schema(io.BytesIO(data))
        names = [n for n in schema.names if n != "text"]
        tables.append(pq.read_table(io.BytesIO(data), columns=names))
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
