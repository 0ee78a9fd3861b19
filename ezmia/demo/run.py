"""``ezmia demo``: the paper's full-vs-LoRA comparison in miniature, offline.

Builds (once, cached) a tokenizer, a small GPT-2 base, a full fine-tune and a LoRA
fine-tune on chunks of Python's own source code (a random split of one pool: pretraining
texts, 1000 members, 1000 non-members), audits both targets and prints the table, with the
headline at the lowest false-positive rate the non-members resolve. With
``--data-uri s3://...`` and a Ray cluster (``RAY_ADDRESS``), the models and data are staged
in S3 and the audits run as a ``ray job submit`` of ``jobs/audit.py``, as in production.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ezmia.data import outputs, storage
from ezmia.demo.build import DEMO_CORPUS, DEMO_COUNTS, DemoArtifacts, build_demo_artifacts
from ezmia.demo.train import DEMO_SIZES
from ezmia.fleet.index import report_location, today
from ezmia.plan.fetch import cache_root
from ezmia.report.model import Summary, SummaryData
from ezmia.stats.metrics import FPR_POINTS
from ezmia.stats.scores import SCORES

REPO = Path(__file__).resolve().parents[2]
JOB_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
           "EZMIA_CACHE")  # fmt: skip
"""The only variables a demo job takes from the submitting shell: none is a secret. The job
gets its S3 credentials from the cluster's own chain (the nodes' environment, an instance or
pod role): a runtime environment is visible to anyone who can run ``ray job list``."""


def batch_spec(artifacts: dict[str, str], out: str, engine: str) -> dict:
    """The two audits of the demo, as an ``ezmia batch`` config."""
    common = {
        "reference": artifacts["base"],
        "members": [artifacts["members"]],
        "nonmembers": [artifacts["nonmembers"]],
        "engine": engine,
        "bootstrap_rounds": 100,
        "overwrite": True,
    }
    return {
        "out": out,
        "defaults": common,
        "audits": [
            {"name": "full-finetune", "target": artifacts["full"]},
            {"name": "lora-finetune", "target": artifacts["lora"]},
        ],
    }


def stage(built: DemoArtifacts, data_uri: str) -> dict[str, str]:
    """Copy models and data under ``data_uri`` (skipped for local runs)."""
    local = {n: getattr(built, n) for n in ("base", "full", "lora", "members", "nonmembers")}
    if not storage.is_s3(data_uri):
        return {name: str(path) for name, path in local.items()}
    staged = {}
    for name, path in local.items():
        uri = storage.join(data_uri, built.root.name, path.name)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            target = uri if file == path else storage.join(uri, str(file.relative_to(path)))
            storage.write_bytes(target, file.read_bytes())
        staged[name] = uri
    return staged


def submit(config_uri: str, timeout_s: float = 1200) -> str:
    """``ray job submit`` of jobs/audit.py to the cluster at ``RAY_ADDRESS``; waits for it
    and returns its submission id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/audit.py --config {config_uri}",
        runtime_env={
            "working_dir": str(REPO),
            "env_vars": {k: os.environ[k] for k in JOB_ENV if k in os.environ},
            "excludes": [".venv", ".cache", ".git", "demo-out", "*.parquet"],
        },
    )
    print(f"submitted Ray job {job}")
    deadline = time.time() + timeout_s
    while not (status := client.get_job_status(job)).is_terminal():
        if time.time() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"Ray job {job} did not finish in {timeout_s:.0f} s")
        time.sleep(2)
    print(client.get_job_logs(job)[-2000:])
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"Ray job {job} ended {status}")
    return job


def _rate(value: float | None) -> str:
    """A TPR, or "n/r" where the non-members are too few to resolve its FPR."""
    return f"{value:.1%}" if value is not None else "n/r"


def table(summaries: dict[str, SummaryData]) -> str:
    """The paper's table in miniature: every registered score (``scores.SCORES``, in its
    order), full fine-tune vs LoRA; then each audit's blind (text-only) baseline and its
    empirical epsilon bound."""
    headers = ["AUC", *(f"TPR@{100 * fpr:g}%" for fpr in FPR_POINTS.values())]
    cell = " ".join(["{:>7}", *["{:>9}"] * len(FPR_POINTS)])
    width = len(cell.format(*[""] * len(headers)))
    first = max(10, *(len(score.label) for score in SCORES.values()))
    lines = [
        f"{'':<{first}}" + "".join(f" | {name:^{width}}" for name in summaries),
        f"{'score':<{first}}" + f" | {cell.format(*headers)}" * len(summaries),
    ]
    lines.append("-" * len(lines[1]))
    for column, score in SCORES.items():
        row = f"{score.label:<{first}}"
        for summary in summaries.values():
            m = summary.metrics.get(column)
            values = (
                (f"{m.auc:.3f}", *(_rate(getattr(m, point)) for point in FPR_POINTS))
                if m
                else ("n/a", *[""] * len(FPR_POINTS))
            )
            row += f" | {cell.format(*values)}"
        lines.append(row)
    lines.append("-" * len(lines[1]))
    blind_row, epsilon_row = f"{'blind AUC':<{first}}", f"{'epsilon >':<{first}}"
    for summary in summaries.values():
        blind, bound = summary.blind_baseline, summary.privacy
        low, high = (blind and blind.auc_ci95) or (None, None)
        blind_cell = (
            f"{blind.auc:.3f}" + (f" [{low:.2f}-{high:.2f}]" if low is not None else "")
            if blind
            else "n/a"
        )
        epsilon_cell = (
            f"{bound.epsilon_lower_bound:.2f} ({SCORES[bound.score].label})" if bound else "n/a"
        )
        blind_row += f" | {blind_cell:<{width}}"
        epsilon_row += f" | {epsilon_cell:<{width}}"
    lines += [blind_row, epsilon_row]
    return "\n".join(lines)


def headline(summaries: dict[str, SummaryData]) -> str:
    """EZ's TPR on each fine-tune at the lowest FPR the non-members resolve, with its exact
    interval; then each audit's verdict."""
    lines = []
    ez = {name: s.metrics.get("ez_score") for name, s in summaries.items()}
    resolved = [p for p in FPR_POINTS if all(m and p in m.operating_points for m in ez.values())]
    if resolved:
        point = min(resolved, key=FPR_POINTS.get)
        n = min(m.n_nonmembers for m in ez.values())
        found = []
        for name, m in ez.items():
            at = m.operating_points[point]
            low, high = at.tpr_exact_ci95
            found.append(f"{at.tpr:.1%} of {name}'s ({low:.1%}-{high:.1%})")
        lines.append(
            f"At {FPR_POINTS[point]:.1%} false positives (the lowest rate {n} non-members "
            f"resolve), {SCORES['ez_score'].label} identifies {' vs '.join(found)} "
            "training records (exact 95% intervals)."
        )
    for name, summary in summaries.items():
        verdict = summary.verdict
        lines.append(f"{name}: {verdict.level.upper()}: {verdict.text}")
        lines += [f"  warning: {w}" for w in verdict.warnings]
    return "\n".join(lines)


def run_demo(out: str, data_uri: str | None) -> int:
    """Build, audit and print the demo; 1 when the batch of audits failed."""
    started = time.time()
    built = build_demo_artifacts(
        cache_root() / "demo", DEMO_SIZES, **DEMO_COUNTS, log=print, corpus=DEMO_CORPUS
    )
    print(f"models ready in {time.time() - started:.0f} s: {built.root}")
    use_job = bool(data_uri and os.environ.get("RAY_ADDRESS"))
    artifacts = stage(built, data_uri or str(built.root))
    spec = batch_spec(artifacts, out, engine="ray" if use_job else "local")
    spec["date"] = date = today()  # the batch's report folders: date=YYYY-MM-DD
    config_uri = storage.join(data_uri or tempfile.mkdtemp(), "demo-audits.yaml")
    storage.write_bytes(config_uri, yaml.safe_dump(spec).encode())
    if use_job:
        submit(config_uri)
    else:
        from ezmia.fleet.batch import run_batch

        if run_batch(config_uri):
            return 1

    summaries = {}
    for audit in spec["audits"]:
        location = report_location(out, audit["name"], date)
        summary = storage.read_bytes(storage.join(location, outputs.SUMMARY))
        summaries[audit["name"]] = Summary.model_validate(json.loads(summary))
    print(f"\n{table(summaries)}\n\n{headline(summaries)}\n")
    Path("demo-out").mkdir(exist_ok=True)
    for name in summaries:
        report = storage.join(report_location(out, name, date), outputs.REPORT)
        copy = Path("demo-out", f"{name}.html")
        copy.write_bytes(storage.read_bytes(report))
        print(f"{name}: {report} (copy: {copy})")
    print(f"demo finished in {time.time() - started:.0f} s")
    return 0
