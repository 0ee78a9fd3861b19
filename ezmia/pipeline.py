"""The Ray engine, in the shape of Ray Data batch inference:

    fragments -> read (CPU tasks) -> tokenize (CPU tasks)
              -> score (actor pool holding target and reference) -> write parts (OUT/scores/)

The driver then gets the score columns only (never texts) for the summary and report.
Scoring actors are restarted by Ray Data when they die and their batches retried; parts are
written (one task per block, where the block lives, with the audit's S3 encryption) only
after every block is materialized, so each input row appears exactly once.

Before any data is read, ``connect`` joins the cluster and refuses what it cannot run: a job
server's http address, an address nothing answers on, actors no alive node can host, more
``min_actors`` than fit at once, a ``--device`` the actors will not see. An error raised on
the cluster reaches the user as one line (``cluster_error``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import socket
from collections import Counter
from pathlib import Path

import pyarrow as pa

from ezmia import errors, outputs, storage
from ezmia.audit import AuditPlan, job_server_address, open_backend, resolve_models
from ezmia.backends import BackendOptions, parse_device, why_not_vllm
from ezmia.config import AuditConfig, RayOptions
from ezmia.errors import EzmiaError, InputError
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


PROBE_TIMEOUT_S = 10.0
"""How long a cluster address may take to accept a TCP connection (``ray.init`` itself
retries an address nothing answers on for minutes)."""

RESOURCE_STEP = 0.0001
"""The finest fraction of a CPU or GPU Ray grants."""

_HOST_PORT = re.compile(r"^(?:ray://)?\[?(?P<host>[^\]/]+?)\]?:(?P<port>\d+)/?$")


def connect(config: AuditConfig) -> None:
    """Join the Ray cluster (``--ray-address``, else ``RAY_ADDRESS``, else a new local one)
    and refuse an audit its alive nodes cannot run, before any model or data is read."""
    import ray

    check_request(config.ray, config.device)
    if not ray.is_initialized():
        address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
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
    check_resources(config.ray, ray.nodes())


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


def check_request(options: RayOptions, device: str) -> None:
    """Refuse GPU requests Ray cannot grant and a ``--device`` the scoring actors will not
    see (no cluster needed)."""
    gpus = options.gpus_per_actor
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


def check_resources(options: RayOptions, nodes: list[dict]) -> None:
    """Refuse scoring actors no alive node can host and more ``min_actors`` than the nodes host
    at once. ``nodes`` is ``ray.nodes()``; nodes an autoscaler has not started yet are not
    counted (the message says so)."""
    cpus, gpus = options.cpus_per_actor, options.gpus_per_actor
    shapes = [
        (n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in nodes
        if n.get("Alive")
    ]
    counted = _describe_nodes(shapes)
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


def _describe_nodes(shapes: list[tuple[float, float]]) -> str:
    """``"alive nodes now: 2 x (2 CPU, 0 GPU)"``, plus what the check cannot see."""
    groups = Counter(shapes)
    listed = ", ".join(f"{n} x ({c:g} CPU, {g:g} GPU)" for (c, g), n in sorted(groups.items()))
    return (
        f"alive nodes now: {listed or 'none'}; nodes an autoscaler has not started are not counted"
    )


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

    def score(
        self, fragments: list[Fragment], output: outputs.Output | None, threshold: float | None
    ) -> pa.Table:
        from ray.exceptions import RayError

        try:
            return self._score(fragments, output, threshold)
        except RayError as err:
            raise cluster_error(err) from err

    def _score(
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
