"""The benchmark run: build fixtures, time each path in its own subprocess, report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import fixtures, report
from benchmarks.measure import MFU_PEAK, hardware, machine_peaks

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SEQUENCES = {"gpt2-small": 64, "demo": 512, "llama-1b": 4096}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="gpt2-small,demo", help="comma-separated")
    parser.add_argument("--targets", default="full,lora", help="full, lora or both")
    parser.add_argument("--sequences", default="", help="e.g. gpt2-small=64,demo=512")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16, help="ezmia's batch size")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--oracle-sequences", type=int, default=8, help="texts also scored in float64 (0: none)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per path, alternating (best kept)"
    )
    parser.add_argument("--workdir", type=Path, help="model cache (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="results dir (default: $OUT or benchmarks/)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_path(spec: dict, workdir: Path) -> dict:
    """One path on one case, alone in a subprocess; its JSON result."""
    stem = workdir / f"{spec['model']}-{spec['kind']}-{spec['path']}"
    stem.with_suffix(".spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [sys.executable, "-m", "benchmarks.paths", str(stem.with_suffix(".spec.json")),
         str(stem.with_suffix(".out.json"))],
        cwd=REPO, env=env, check=True,
    )  # fmt: skip
    return json.loads(stem.with_suffix(".out.json").read_text())


def fastest(runs: list[dict]) -> dict:
    """The fastest of a path's runs, with the highest memory any of them reached."""
    best = min(runs, key=lambda r: r["seconds"])
    return {
        **best,
        "all_seconds": [r["seconds"] for r in runs],
        "peak_mb": max(r["peak_mb"] for r in runs),
        "delta_mb": max(r["delta_mb"] for r in runs),
    }


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[tuple[dict, int]]:
    """Both paths on each target of one model: ``({path: result}, N)`` per target."""
    log(f"building {name} checkpoints")
    save_dtype = torch.bfloat16 if name == "llama-1b" else torch.float32
    fixture = fixtures.build(name, workdir, args.device, save_dtype)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return time_cases(name, fixture, args.sequences[name], args, workdir, args.oracle_sequences)


def time_cases(
    name: str,
    fixture: fixtures.Fixture,
    n_texts: int,
    args: argparse.Namespace,
    workdir: Path,
    oracle_sequences: int,
) -> list[tuple[dict, int]]:
    """Both paths on each of ``args.targets`` of one fixture: ``({path: result}, N)`` each.

    The paths alternate, one timed run per subprocess, ``--repeats`` rounds: a burst of load
    from other processes then spoils one run of each path rather than every run of one. With
    ``oracle_sequences``, the float64 oracle runs once after them."""
    texts_file = workdir / f"texts-{name}.json"
    texts_file.write_text(json.dumps(fixtures.texts(n_texts)))
    results = []
    for kind in args.targets:
        spec = {
            "model": name, "kind": kind, "texts": str(texts_file),
            "target": str(fixture.target(kind)), "base": str(fixture.base),
            "adapter": kind == "lora", "device": args.device, "dtype": args.dtype,
            "batch_size": args.batch_size, "max_length": args.max_length,
            "oracle_sequences": oracle_sequences,
        }  # fmt: skip
        timed: dict[str, list[dict]] = {"ezmia": [], "baseline": []}
        for _ in range(args.repeats):
            for path, runs in timed.items():
                runs.append(run_path({**spec, "path": path}, workdir))
                log(f"{name} {kind} {path}: {runs[-1]['seconds']:.2f} s")
        runs = {path: fastest(r) for path, r in timed.items()}
        if oracle_sequences:
            runs["oracle"] = run_path({**spec, "path": "oracle"}, workdir)
        results.append((runs, fixture.flop_params))
    return results


def summarize(args: argparse.Namespace, runs: list[tuple[dict, int]], peaks: dict) -> dict:
    """Figures of every case, ezmia/baseline comparisons and goal checks."""
    cases, comparisons = [], []
    for pair, flop_params in runs:
        tokens = pair["ezmia"]["tokens"]
        fast, base = (
            report.case_figures(pair[p], peaks, flop_params, tokens) for p in ("ezmia", "baseline")
        )
        cases += [fast, base]
        comparisons.append(report.comparison(pair, fast, base))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "max_length": args.max_length,
        "sequences": args.sequences,
        "repeats": args.repeats,
        "peaks": peaks,
        "mfu_peak": MFU_PEAK[torch.device(args.device).type],
        "cases": cases,
        "comparisons": comparisons,
        "goals": report.goal_checks(comparisons, args.device),
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(report.markdown(results))
    log(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.models, args.targets = args.models.split(","), args.targets.split(",")
    counts = dict(item.split("=") for item in args.sequences.split(",") if item)
    args.sequences = {m: int(counts.get(m, DEFAULT_SEQUENCES[m])) for m in args.models}
    device = torch.device(args.device)
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks")
    info = hardware(device)
    log("measuring the matmul peak")
    peaks = machine_peaks(device)
    runs: list[tuple[dict, int]] = []
    with tempfile.TemporaryDirectory(prefix="ezmia-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            runs += bench_model(name, args, workdir)
            write({**summarize(args, runs, peaks), "hardware": info, "partial": True}, out)
    log("measuring the matmul peak again")
    # MFU is against the higher of two peak measurements, one before and one after.
    peaks = {k: max(v, peaks[k]) for k, v in machine_peaks(device).items()}
    info["load_average_end"] = list(os.getloadavg())
    results = {**summarize(args, runs, peaks), "hardware": info}
    write(results, out)
    print(report.table(results["cases"], report.CASE_COLUMNS))
    print()
    print(report.table(results["comparisons"], report.RATIO_COLUMNS))
    print(report.disturbed_peak_warning(results["cases"]), end="")
