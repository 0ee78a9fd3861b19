"""Whole processes on the same inputs, as a user waits for them: ``python -m ezmia audit``
(planning and checks, both passes, every score, the summary with its metrics, the blind
baseline and the report, ``_SUCCESS``) against the paper's scoring path run as a process
(load both models, EZ scores, the AUC). Imports and model loading count for both. The two
alternate, ``--repeats`` rounds, each one's fastest kept; written to
``benchmarks/whole_process.json``.

    python -m benchmarks.whole_process [--model gpt2-small] [--sequences 48] [--repeats 3]
                                      [--min-chars 0] [--out whole_process.json]
    python -m benchmarks.whole_process baseline TARGET BASE MEMBERS NONMEMBERS MAX_LENGTH
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def baseline(target: str, base: str, members: str, nonmembers: str, max_length: str) -> None:
    """The paper's path as one process: its models, its EZ scores, scikit-learn's AUC."""
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from benchmarks.baseline import compute_ez_scores, load_models
    from ezmia.data.text import load_tokenizer

    texts = [pq.read_table(f).column("text").to_pylist() for f in (members, nonmembers)]
    models = load_models(Path(target), Path(base), adapter=False)
    scores = compute_ez_scores(
        load_tokenizer(Path(base)), *models, texts[0] + texts[1], sequence_length=int(max_length)
    )
    labels = [1] * len(texts[0]) + [0] * len(texts[1])
    print(json.dumps({"auc": roc_auc_score(labels, scores)}))


def timed(command: list[str]) -> float:
    """Wall seconds of one process, which must succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def measure(args: argparse.Namespace) -> dict:
    """Fixture, inputs, then the alternating timed processes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks import fixtures

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ezmia-whole-"))
    fixture = fixtures.build(args.model, workdir, "cpu", torch.float32)
    texts = fixtures.texts(args.sequences, min_chars=args.min_chars)
    half = len(texts) // 2
    files = {}
    for name, part in (("members", texts[:half]), ("nonmembers", texts[half:])):
        files[name] = workdir / f"{name}.parquet"
        pq.write_table(pa.table({"text": part}), files[name])
    target, base = str(fixture.target("full")), str(fixture.base)
    seconds: dict[str, list[float]] = {"ezmia": [], "baseline": []}
    for round_ in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="audit-", dir=workdir)) / "out"  # a reused workdir too
        seconds["ezmia"].append(timed([
            sys.executable, "-m", "ezmia", "audit", "--target", target, "--reference", base,
            "--members", str(files["members"]), "--nonmembers", str(files["nonmembers"]),
            "--out", str(out), "--max-length", str(args.max_length), "--device", "cpu",
            "--dtype", "float32", "--engine", "local", "--cache-dir", str(workdir / "cache"),
        ]))  # fmt: skip
        seconds["baseline"].append(timed([
            sys.executable, "-m", "benchmarks.whole_process", "baseline", target, base,
            str(files["members"]), str(files["nonmembers"]), str(args.max_length),
        ]))  # fmt: skip
        print(f"[whole] round {round_}: ezmia {seconds['ezmia'][-1]:.1f} s, baseline "
              f"{seconds['baseline'][-1]:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    best = {path: min(values) for path, values in seconds.items()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "sequences": args.sequences,
        "max_length": args.max_length,
        "min_chars": args.min_chars,
        "seconds": seconds,
        "best_s": best,
        "speedup": best["baseline"] / best["ezmia"],
        "load_average_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["baseline"]:
        baseline(*argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--min-chars", type=int, default=0, help="texts of at least this many characters"
    )
    parser.add_argument("--workdir", help="fixture cache (default: a new temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "whole_process.json")
    args = parser.parse_args(argv)
    result = measure(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["best_s"]), f"speedup {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
