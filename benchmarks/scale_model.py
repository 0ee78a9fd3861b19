"""A measured scale model of ``ezmia batch`` on a local (loopback) Ray cluster:

    nice .venv/bin/python benchmarks/scale_model.py [--audits 20] [--sizes 1000,3000,10000,100000]

On a tiny GPT-2 (the run measures the engine, not the model), in one run:

1. **Side by side**: a batch of ``--audits`` small audits (``--rows`` texts each) with
   ``max_in_flight`` 1 (one after another), then with ``--max-in-flight`` (default: the batch's
   own rule, ``ezmia.fleet.batch.default_in_flight``); the wall-clock ratio of the two.
2. **Fixed and per-sequence cost**: one Ray audit at each of ``--sizes`` texts, and one local
   audit at the sizes up to ``--local-max``; wall seconds = fixed + per-sequence x texts,
   fitted by least squares, per engine (their difference is the Ray machinery's).
3. **Memory** at each size: the driver's peak RSS (``VmHWM``, reset before the audit) and the
   object store's peak use (sampled from the raylets every ``--sample-s`` seconds), beside the
   size of the score columns the audit returns.

The Ray cluster is started here, bound to 127.0.0.1, with ``--cpus`` logical CPUs (default 4,
as the tests' two-node loopback cluster: a full target's two model stages at 0.5 CPU each
leave room for 3 audits beside one CPU for the tasks; the cores are this machine's). Every
audit: one actor per model stage (``--cpus-per-actor``), ``--max-length`` tokens, no labels
(scores only) and no bootstrap. Results go to ``scale_model.json`` under ``--out`` (default:
``$OUT`` or ``benchmarks/``), with ``estimate``: the model applied to an organization-wide
batch (``--estimate-*``; see benchmarks/README.md for the assumptions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--audits", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200, help="texts per audit of the batch")
    parser.add_argument("--max-in-flight", type=int, help="default: the batch's own rule")
    parser.add_argument("--sizes", default="1000,3000,10000,100000")
    parser.add_argument("--local-max", type=int, default=10_000)
    parser.add_argument("--cpus", type=float, default=4.0, help="the cluster's logical CPUs")
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--rows-per-block", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--sample-s", type=float, default=0.25)
    parser.add_argument("--estimate-checkpoints", type=int, default=200)
    parser.add_argument("--estimate-texts", type=int, default=100_000)
    parser.add_argument("--estimate-gpus", type=int, default=64)
    parser.add_argument("--estimate-seq-per-gpu-s", type=float, default=110.0)
    parser.add_argument("--estimate-load-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


class ObjectStorePeak:
    """The cluster's peak object store use (and spilled bytes) while the block runs."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.peak = self.spilled = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address()
        while not self._stop.is_set():
            try:
                stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
            except Exception as err:  # a slow raylet: this sample is lost, not the run
                self.errors.append(" ".join(str(err).split())[:200])
            else:
                self.peak = max(self.peak, stats.object_store_bytes_used)
                self.spilled = max(self.spilled, stats.spilled_bytes_total)
            self._stop.wait(self.every_s)

    def __enter__(self) -> ObjectStorePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_texts(n: int, path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks import fixtures

    pq.write_table(pa.table({"text": fixtures.texts(n)}), path, row_group_size=4096)
    return str(path)


def audit_options(args: argparse.Namespace, models, data: str, engine: str) -> dict:
    return {
        "target": str(models.full), "reference": str(models.base), "data": [data],
        "engine": engine, "max_length": args.max_length, "bootstrap_rounds": 0,
        "ray": {"max_actors": 1, "cpus_per_actor": args.cpus_per_actor,
                "rows_per_block": args.rows_per_block},
    }  # fmt: skip


def timed_batch(args: argparse.Namespace, models, data: str, work: Path, flight: int | None):
    """Wall seconds, audits at once and driver peak of one batch of ``--audits`` audits."""
    import yaml

    from benchmarks.measure import PeakMemory
    from ezmia.fleet.batch import in_flight, plan_batch, run_batch

    options = audit_options(args, models, data, "ray")
    del options["target"]
    targets = [models.full, models.lora]
    spec = {
        "out": str(work / f"batch-{flight or 'default'}"), "defaults": options,
        "audits": [{"name": f"a{i:02d}", "target": str(targets[i % 2])}
                   for i in range(args.audits)],
    }  # fmt: skip
    if flight:
        spec["max_in_flight"] = flight
    path = work / f"batch-{flight or 'default'}.yaml"
    path.write_text(yaml.safe_dump(spec))
    memory = PeakMemory(device_cpu())
    memory.start()
    started = time.perf_counter()
    code = run_batch(str(path))
    seconds = time.perf_counter() - started
    if code:
        raise SystemExit(f"the batch of {path} failed")
    return {"seconds": seconds, "in_flight": in_flight(*plan_batch(str(path))),
            "driver": memory.stop()}  # fmt: skip


def device_cpu():
    import torch

    return torch.device("cpu")


def sized_audit(args: argparse.Namespace, models, data: str, out: Path, engine: str) -> dict:
    """Wall seconds, driver peak RSS and object store peak of one audit."""
    from benchmarks.measure import PeakMemory
    from ezmia.audit import audit
    from ezmia.config import AuditConfig

    config = AuditConfig(**audit_options(args, models, data, engine), out=str(out))
    memory = PeakMemory(device_cpu())
    memory.start()
    with ObjectStorePeak(args.sample_s) as store:
        started = time.perf_counter()
        result = audit(config)
        seconds = time.perf_counter() - started
    import pyarrow.parquet as pq

    from ezmia.data.outputs import part_files

    return {
        "seconds": seconds,
        "timings": result.summary.timings,
        "driver": memory.stop(),
        "object_store_peak_mb": store.peak / 2**20,
        "object_store_spilled_mb": store.spilled / 2**20,
        "object_store_sample_errors": store.errors[:3],
        "scores_mb": sum(pq.read_table(f).nbytes for f in part_files(str(out))) / 2**20,
    }


def fit(sizes: list[int], seconds: list[float]) -> dict:
    """Least squares ``seconds = fixed_s + per_sequence_ms / 1000 x texts``."""
    import numpy as np

    x, y = np.asarray(sizes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    return {"fixed_s": float(intercept), "per_sequence_ms": float(slope * 1000),
            "max_residual_s": float(abs(residual).max())}  # fmt: skip


def estimate(args: argparse.Namespace, ray_fit: dict, local_fit: dict) -> dict:
    """Wall time of ``--estimate-checkpoints`` audits of ``--estimate-texts`` texts on
    ``--estimate-gpus`` GPUs, for a few GPUs per audit (its model stages' actors together):
    every audit pays the model load and the measured Ray fixed cost once; its texts cost their
    GPU-seconds (both passes) plus the measured Ray per-sequence overhead, spread over its
    GPUs; audits run in waves of ``GPUs / GPUs per audit``."""
    import math

    overhead_ms = max(0.0, ray_fit["per_sequence_ms"] - local_fit["per_sequence_ms"])
    gpu_ms = 1000 / args.estimate_seq_per_gpu_s
    rows = []
    for gpus in (1, 8, args.estimate_gpus):
        at_once = max(1, args.estimate_gpus // gpus)
        audit_s = (args.estimate_load_s + ray_fit["fixed_s"]
                   + args.estimate_texts * (gpu_ms + overhead_ms) / 1000 / gpus)  # fmt: skip
        waves = math.ceil(args.estimate_checkpoints / at_once)
        rows.append({"gpus_per_audit": gpus, "audits_at_once": at_once,
                     "audit_minutes": audit_s / 60, "waves": waves,
                     "batch_hours": waves * audit_s / 3600})  # fmt: skip
    return {
        "checkpoints": args.estimate_checkpoints, "texts": args.estimate_texts,
        "gpus": args.estimate_gpus, "sequences_per_gpu_s": args.estimate_seq_per_gpu_s,
        "model_load_s": args.estimate_load_s, "ray_fixed_s": ray_fit["fixed_s"],
        "ray_per_sequence_overhead_ms": overhead_ms,
        "pure_scoring_hours": args.estimate_checkpoints * args.estimate_texts * gpu_ms / 1000
        / 3600 / args.estimate_gpus,
        "layouts": rows,
    }  # fmt: skip


def last_commit(path: str) -> str:
    """The last commit that changed ``path`` (what engine the figures are of)."""
    import subprocess

    found = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cI", "--", path],
                           capture_output=True, text=True)  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "--", path]).returncode
    return found.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    args = parse_args()
    os.environ.update(LOOPBACK)
    import ray
    import torch

    from benchmarks import fixtures

    torch.set_num_threads(max(1, round(args.cpus_per_actor)))  # the local engine's threads
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="ezmia-scale-") as tmp:
        work = Path(tmp)
        models = fixtures.build("tiny", work)
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")  # fmt: skip
        results["ray_start_s"] = time.perf_counter() - started
        small = write_texts(args.rows, work / "small.parquet")
        serial = timed_batch(args, models, small, work, 1)
        side = timed_batch(args, models, small, work, args.max_in_flight)
        results["batch"] = {"audits": args.audits, "rows": args.rows, "serial": serial,
                            "side_by_side": side,
                            "speedup": serial["seconds"] / side["seconds"]}  # fmt: skip
        print(f"batch of {args.audits}: one at a time {serial['seconds']:.0f} s, "
              f"{side['in_flight']} at once {side['seconds']:.0f} s", flush=True)  # fmt: skip
        runs: dict[str, dict[int, dict]] = {"ray": {}, "local": {}}
        for n in sizes:
            data = write_texts(n, work / f"texts-{n}.parquet")
            for engine in ("local", "ray"):
                if engine == "ray" or n <= args.local_max:
                    runs[engine][n] = sized_audit(args, models, data, work / f"{engine}-{n}",
                                                  engine)  # fmt: skip
                    print(f"{engine} {n}: {runs[engine][n]['seconds']:.1f} s", flush=True)
        ray.shutdown()
    fits = {e: fit(list(r), [x["seconds"] for x in r.values()]) for e, r in runs.items()}
    results.update(runs=runs, fits=fits, estimate=estimate(args, fits["ray"], fits["local"]))
    results.update(cpu_count=os.cpu_count(), load_average=list(os.getloadavg()),
                   pipeline_commit=last_commit("ezmia/engines/pipeline.py"))  # fmt: skip
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_model.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"batch": results["batch"], "fits": fits}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
