"""Many audits in one run (the org-wide Ray job): one YAML, one report per checkpoint under
``OUT/date=YYYY-MM-DD/checkpoint=<name>/`` and one index row per audit under ``OUT/index/``.

Audits run side by side, up to ``max_in_flight`` at once, each its own ``audit(config)`` call
in a thread of this process (on Ray: its own Ray Data pipeline and model stages' actor pools
on the one cluster). An audit's index row is written as soon as it finishes; one audit's
failure stops neither the others nor their rows. Default ``max_in_flight``
(``default_in_flight``): on Ray, as many audits as the cluster's alive nodes host with every
model stage's actor pool at its ``max_actors``, by GPUs when the audits ask for GPUs and by
CPUs (one CPU kept for the read, tokenize, score and write tasks of every audit). Local
audits run one at a time (transformers loads models through process-wide state, and a local
audit's scoring already takes every core, or the one GPU, of this process).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ezmia.audit import audit
from ezmia.config import AuditConfig, Strict, load_yaml, parse_model
from ezmia.data import outputs, storage
from ezmia.engines.cluster import actors_per_node, connect, stage_gpus
from ezmia.errors import EzmiaError, InputError, Interrupted, one_line
from ezmia.fleet import index
from ezmia.plan.planner import use_ray

log = logging.getLogger(__name__)

TASK_CPUS = 1.0
"""CPUs the default ``max_in_flight`` leaves free of scoring actors on a Ray cluster, for the
read, tokenize and write tasks of every audit in flight (audits whose actors held every CPU
would wait for tasks that never start)."""


class BatchConfig(Strict):
    """``out``: the audit root; ``defaults``: options every audit gets; ``audits``: one entry
    per checkpoint (any ``AuditConfig`` option; ``name`` names its report folder);
    ``max_in_flight``: most audits running at once (default: see ``default_in_flight``)."""

    out: str = Field(min_length=1, pattern=r"\S")
    defaults: dict[str, Any] = {}
    audits: list[dict[str, Any]] = Field(min_length=1)
    date: dt.date | None = None
    max_in_flight: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Outcome:
    """How one audit of the batch ended: its verdict and report, or why it failed."""

    name: str
    level: str | None = None
    report: str | None = None
    error: str | None = None

    def line(self) -> str:
        if self.error is not None:
            return f"FAILED {self.name}: {self.error}"
        return f"{self.level:>8} {self.name}: {self.report}"


def merge(defaults: dict, entry: dict) -> dict:
    """``entry`` over ``defaults``, merging nested option groups (``ray``, ``vllm``)."""
    merged = {**defaults, **entry}
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            merged[key] = {**defaults[key], **value}
    return merged


def plan_batch(path: str) -> tuple[BatchConfig, list[AuditConfig]]:
    """Validate the whole file (every audit) before the first audit starts."""
    batch = parse_model(BatchConfig, load_yaml(path), path)
    configs: list[AuditConfig] = []
    names: dict[str, str] = {}
    for number, entry in enumerate(batch.audits, start=1):
        values = merge(batch.defaults, entry)
        name = values.get("name") or str(values.get("target", "")).rstrip("/").rsplit("/", 1)[-1]
        folder = index.safe_name(name)
        if not name or folder in names:
            raise InputError(
                f"{path}: audit #{number} needs a unique name (got {name!r}, whose report "
                f"folder checkpoint={folder} another audit already uses); set `name:`"
            )
        names[folder] = name
        date = batch.date.isoformat() if batch.date else None
        values.update(name=name, out=index.report_location(batch.out, name, date))
        configs.append(parse_model(AuditConfig, values, f"{path}: audit #{number} ({name})"))
    return batch, configs


def footprint(config: AuditConfig, cluster_has_gpus: bool) -> tuple[float, float]:
    """CPUs and GPUs an audit's actors hold with every model stage's pool at ``max_actors``
    (a full target: target and reference stages; a LoRA target: one shared base stage)."""
    gpus = stage_gpus(config, cluster_has_gpus)
    actors = config.ray.max_actors
    return actors * len(gpus) * config.ray.cpus_per_actor, actors * sum(gpus.values())


def default_in_flight(configs: list[AuditConfig], cluster: dict[str, float]) -> int:
    """Ray audits at once when the YAML sets no ``max_in_flight``. ``cluster``: the Ray
    cluster's total resources (``ray.cluster_resources()``, the nodes alive now). Each audit is
    counted at the largest ``footprint`` of the batch: by GPUs when the audits ask for GPUs,
    and by the CPUs left after ``TASK_CPUS``; at least 1, at most the number of audits."""
    shapes = [footprint(config, cluster.get("GPU", 0.0) > 0) for config in configs]
    cpus, gpus = max(c for c, _ in shapes), max(g for _, g in shapes)
    free = (cluster.get("CPU", 0.0) - TASK_CPUS, cluster.get("GPU", 0.0))
    return max(1, min(len(configs), actors_per_node(free, cpus, gpus)))


def join_cluster(configs: list[AuditConfig]) -> dict[str, float] | None:
    """Join the Ray cluster before any audit thread starts (``ray.init`` once per process) and
    return its resources; ``None`` when no audit uses Ray, or the cluster could not be joined
    (the audits then fail one by one, saying why)."""
    on_ray = [config for config in configs if use_ray(config)]
    if not on_ray:
        return None
    import ray

    with contextlib.suppress(EzmiaError):  # the first Ray audit reports it as its own failure
        connect(on_ray[0])
    return ray.cluster_resources() if ray.is_initialized() else None


def in_flight(batch: BatchConfig, configs: list[AuditConfig]) -> int:
    """How many audits of the batch run at once: ``max_in_flight`` or ``default_in_flight``
    on Ray; 1 when any audit scores locally (transformers loads models through process-wide
    state, so two local audits loading at once break each other) or no cluster was joined."""
    cluster = join_cluster(configs)
    if not all(use_ray(config) for config in configs) or cluster is None:
        if (batch.max_in_flight or 1) > 1:
            log.warning("max_in_flight %d ignored: local audits and audits that cannot join "
                        "their Ray cluster run one at a time", batch.max_in_flight)  # fmt: skip
        return 1
    return min(batch.max_in_flight or default_in_flight(configs, cluster), len(configs))


def run_one(config: AuditConfig, root: str, date: str) -> Outcome:
    """One audit, then its index row; any failure becomes the outcome's one-line error."""
    name = config.display_name
    try:
        result = audit(config)
    except EzmiaError as err:
        return Outcome(name, error=one_line(err))
    except Exception as err:  # a bug or a library failure: the other audits go on
        log.error("audit %s failed", name, exc_info=err)
        return Outcome(name, error=_describe(err))
    report = storage.join(result.out, outputs.REPORT)
    level = result.summary.verdict.level
    try:
        row = index.index_row(result, index.dataset_label(config))
        index.write_index(root, [row], config.encryption, date)
    except Exception as err:
        return Outcome(name, level, report, f"{report} is finished but its index row was not "
                       f"written ({_describe(err)}); rerun the batch to index it")  # fmt: skip
    log.info("finished %s: %s %s", name, level, report)
    return Outcome(name, level, report)


def _describe(err: Exception) -> str:
    """One line for an error no ezmia module turned into an ``EzmiaError``."""
    reason = storage.describe_s3_error(err)
    text = f"S3: {reason}" if reason else f"{type(err).__name__}: {err}"
    return one_line(text)


def run_side_by_side(jobs: list[Callable[[], Outcome]], limit: int) -> list[Outcome]:
    """Run ``jobs`` with up to ``limit`` at once, in threads (1: in this thread, one after
    another). On Ctrl-C or SIGTERM (a ``KeyboardInterrupt`` in this thread) the queued jobs
    are dropped and each running one is interrupted too, so that every audit removes what
    it wrote, as a lone audit does; then the interrupt goes on."""
    if limit <= 1:
        return [job() for job in jobs]
    running: dict[int, int] = {}
    lock = threading.Lock()

    def tracked(number: int) -> Outcome:
        with lock:
            running[number] = threading.get_ident()
        try:
            return jobs[number]()
        finally:
            with lock:
                running.pop(number, None)

    # transformers resolves its lazy attributes on first use, and two threads doing that at
    # once can fail ("cannot import name 'AutoTokenizer'"): resolve them here, in one thread.
    from peft import PeftModel  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.activations import GELUTanh  # noqa: F401

    pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="ezmia-audit")
    futures = [pool.submit(tracked, number) for number in range(len(jobs))]
    try:
        for future in as_completed(futures):
            future.result()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for ident in running.values():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(Interrupted)
                )
        wait(futures)
        raise
    pool.shutdown()
    return [future.result() for future in futures]


def run_batch(path: str) -> int:
    """Run every audit of the file, side by side; one failure does not stop the others. Prints
    one line per audit (verdict and report, or why it failed) and the count; exit code 1
    when any audit failed."""
    batch, configs = plan_batch(path)
    date = index.today()  # the day the batch started names its index partition
    limit = in_flight(batch, configs)
    log.info("%d audits, up to %d at once", len(configs), limit)
    jobs = [functools.partial(run_one, config, batch.out, date) for config in configs]
    outcomes = run_side_by_side(jobs, limit)
    for outcome in outcomes:
        print(outcome.line())
    failed = sum(outcome.error is not None for outcome in outcomes)
    indexed = len(outcomes) - failed
    folder = storage.join(batch.out, "index", f"date={date}")
    print(f"{indexed} audits indexed in {folder if indexed else None}; {failed} failed")
    return 1 if failed else 0
