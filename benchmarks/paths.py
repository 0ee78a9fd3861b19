"""The two scoring paths the benchmark times, each run alone in a subprocess:

    python -m benchmarks.paths SPEC.json OUT.json

``ezmia``: tokenize (``ezmia.data.text.tokenize``), both passes and statistics
(``TorchBackend.token_stats``), every score (``score_sequence``). ``baseline``: the reference
code's path (``benchmarks/baseline.py``). ``oracle``: the baseline's code in float64 on the
first ``oracle_sequences`` texts, the yardstick for both paths' rounding. Model loading and a
one-text warm-up (which also pages the weights in) are not timed; scoring is timed once
(``benchmarks.harness`` alternates the paths and keeps each one's fastest run); memory is the
peak during scoring (``measure.PeakMemory``).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import baseline
from benchmarks.measure import PeakMemory, Timer, mfu_peak
from ezmia.backends.torch import TorchBackend
from ezmia.data.text import load_tokenizer, tokenize
from ezmia.plan.models import plan_models
from ezmia.stats.scores import score_sequence

Scorer = Callable[[list[str]], dict]


def ezmia_path(spec: dict) -> tuple[torch.device, Scorer]:
    """ezmia's whole scoring path, models loaded."""
    plan = plan_models(spec["target"], spec["base"])
    backend = TorchBackend(
        plan, device=spec["device"], dtype=spec["dtype"], batch_size=spec["batch_size"]
    )
    tokenizer = load_tokenizer(plan.tokenizer)

    def score(texts: list[str]) -> dict:
        tokens = tokenize(tokenizer, texts, spec["max_length"])
        stats = backend.token_stats(tokens.input_ids)
        rows = [
            score_sequence(s, len(ids), size)
            for s, ids, size in zip(stats, tokens.input_ids, tokens.zlib_size, strict=True)
        ]
        return {
            "tokens": sum(len(ids) for ids in tokens.input_ids),
            "ez_score": [float(r["ez_score"]) for r in rows],
            "ez_status": [str(r["ez_status"]) for r in rows],
        }

    return backend.device, score


def baseline_path(spec: dict, dtype: str | None = None) -> tuple[torch.device, Scorer]:
    """The reference code's path (in ``dtype``; float64 makes it the oracle), models loaded."""
    device, dtype = torch.device(spec["device"]), dtype or spec["dtype"]
    models = baseline.load_models(
        Path(spec["target"]), Path(spec["base"]), spec["adapter"], str(device), dtype
    )
    compute = functools.partial(
        baseline.compute_ez_scores,
        load_tokenizer(Path(spec["base"])),
        *models,
        device=str(device),
        sequence_length=spec["max_length"],
        logprob_dtype=torch.float64 if dtype == "float64" else torch.float32,
    )
    return device, lambda texts: {"ez_score": compute(texts)}


PATHS = {
    "ezmia": ezmia_path,
    "baseline": baseline_path,
    "oracle": functools.partial(baseline_path, dtype="float64"),
}


def timed(score: Scorer, texts: list[str], device: torch.device) -> dict:
    """One timed run of ``score(texts)`` with its peak memory, and the MFU matmul peak
    measured right before and right after it (the higher): a slow spell of a shared machine
    then lowers the run and its peak together."""
    before = mfu_peak(device)
    memory = PeakMemory(device)
    memory.start()
    with Timer(device) as timer:
        result = score(texts)
    figures = {**timer.figures, **memory.stop()}
    return {**figures, "adjacent_peak": max(before, mfu_peak(device)), **result}


def run(spec: dict, texts: list[str]) -> dict:
    """Load the path's models, warm up on one text (which also pages the weights in), time."""
    started = time.perf_counter()
    device, score = PATHS[spec["path"]](spec)
    score(texts[:1])
    load_s = time.perf_counter() - started
    if spec["path"] == "oracle":
        texts = texts[: spec["oracle_sequences"]]
    return {"load_s": load_s, **timed(score, texts, device)}


def main(spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    texts = json.loads(Path(spec["texts"]).read_text())
    result = run(spec, texts)
    Path(out_file).write_text(json.dumps({**spec, **result}))


if __name__ == "__main__":
    main(*sys.argv[1:])
