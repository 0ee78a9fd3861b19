"""The Ray engine's overhead against the local engine, on the same data and model:

    .venv/bin/python benchmarks/ray_overhead.py [--sequences 20000] [--out DIR]

A tiny GPT-2 (so 20,000 sequences finish in minutes on 2 CPUs: the run measures the engine,
not the model) scores the same Parquet file through ``ezmia.audit.audit`` with
``engine="local"`` and ``engine="ray"`` (one scoring actor; ``--actors``/``--cpus-per-actor``
to change). Both engines get the same scoring threads: Ray gives each actor as many torch
threads as it has CPUs (``OMP_NUM_THREADS``), so the local engine runs with ``actors x
cpus-per-actor`` threads; the ratio is then the cost of the Ray machinery (Ray Data's read and
tokenize stages, object transfers, part writes), not of fewer cores. A single actor cannot take
both cores of a 2-CPU machine: Ray Data's read tasks need a CPU of their own.
Ray's cluster start is timed apart: a long-lived cluster pays it once. The engines
alternate ``--repeats`` times and each keeps its fastest run, so a burst of load from other
processes does not decide the ratio. Results go to ``ray_overhead.json`` under ``--out``
(default: ``$OUT`` or ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=int, default=20_000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--rows-per-block", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def scoring_threads(args: argparse.Namespace) -> int:
    """Torch threads of the local engine: the CPUs all Ray scoring actors hold together."""
    return max(1, round(args.actors * args.cpus_per_actor))


def write_dataset(texts: list[str], path: Path, row_group: int = 2048) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group)
    return str(path)


def timed_audit(config) -> dict:
    """Wall seconds of one audit, with the audit's own phase timings."""
    from ezmia.audit import audit

    started = time.perf_counter()
    result = audit(config)
    return {"seconds": time.perf_counter() - started, "timings": result.summary.timings}


def run_engines(args: argparse.Namespace, work: Path) -> tuple[dict[str, list[dict]], float]:
    """Every audit run per engine (alternating), and the seconds Ray took to start."""
    import ray
    import torch

    from benchmarks import fixtures
    from ezmia.config import AuditConfig, RayOptions

    models = fixtures.build("tiny", work)
    data = write_dataset(fixtures.texts(args.sequences), work / "texts.parquet")
    ray_options = RayOptions(
        min_actors=args.actors,
        max_actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        rows_per_block=args.rows_per_block,
    )
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    torch.set_num_threads(scoring_threads(args))
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for run in range(args.repeats):
        for engine in runs:
            config = AuditConfig(
                target=str(models.full), reference=str(models.base), data=[data],
                out=str(work / f"out-{engine}-{run}"), engine=engine, bootstrap_rounds=0,
                ray=ray_options,
            )  # fmt: skip
            runs[engine].append(timed_audit(config))
    ray.shutdown()
    return runs, ray_start_s


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="ezmia-ray-overhead-") as tmp:
        runs, ray_start_s = run_engines(args, Path(tmp))
    best = {engine: min(r, key=lambda x: x["seconds"]) for engine, r in runs.items()}
    report(args, best["local"], best["ray"], ray_start_s, runs)


def report(
    args: argparse.Namespace, local: dict, on_ray: dict, ray_start_s: float, runs: dict
) -> None:
    results = {
        "sequences": args.sequences,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "cpu_count": os.cpu_count(),
        "scoring_threads": scoring_threads(args),
        "local": local,
        "ray": on_ray,
        "ray_start_s": ray_start_s,
        "overhead": on_ray["seconds"] / local["seconds"],
        "overhead_with_start": (on_ray["seconds"] + ray_start_s) / local["seconds"],
        "all_seconds": {engine: [r["seconds"] for r in rs] for engine, rs in runs.items()},
        "load_average": list(os.getloadavg()),
    }
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{args.sequences} sequences: local {local['seconds']:.1f} s, Ray {on_ray['seconds']:.1f}"
        f" s (+{ray_start_s:.1f} s cluster start), {results['scoring_threads']} scoring"
        f" thread(s) each: Ray/local = {results['overhead']:.2f}x "
        f"({results['overhead_with_start']:.2f}x with the start); goal <= 1.2x"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
