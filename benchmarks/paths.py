"""The two scoring paths the benchmark times, each run alone in a subprocess:

    python -m benchmarks.paths SPEC.json OUT.json

``ezmia``: tokenize (``ezmia.text.tokenize``), both passes and statistics
(``TorchBackend.token_stats``), every score (``score_sequence``). ``baseline``: the reference
code's path (``benchmarks/baseline.py``). ``oracle``: the baseline's code in float64 on the
first ``oracle_sequences`` texts, the yardstick for both paths' rounding. Model loading and a
one-text warm-up (which also pages the weights in) are not timed; memory is the peak during
scoring (``measure.PeakMemory``).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import baseline
from benchmarks.measure import PeakMemory, Timer
from ezmia.backends.torch import TorchBackend
from ezmia.models import plan_models
from ezmia.scores import score_sequence
from ezmia.text import load_tokenizer, tokenize


def run_ezmia(spec: dict, texts: list[str]) -> dict:
    """Score ``texts`` with ezmia's whole scoring path."""
    started = time.perf_counter()
    plan = plan_models(spec["target"], spec["base"])
    backend = TorchBackend(
        plan, device=spec["device"], dtype=spec["dtype"], batch_size=spec["batch_size"]
    )
    tokenizer = load_tokenizer(plan.tokenizer)
    backend.token_stats(tokenize(tokenizer, texts[:1], spec["max_length"]).input_ids)
    load_s = time.perf_counter() - started
    memory = PeakMemory(backend.device)
    memory.start()
    with Timer(backend.device) as timer:
        tokens = tokenize(tokenizer, texts, spec["max_length"])
        stats = backend.token_stats(tokens.input_ids)
        rows = [
            score_sequence(s, len(ids), size)
            for s, ids, size in zip(stats, tokens.input_ids, tokens.zlib_size, strict=True)
        ]
    return {
        **timer.figures,
        "load_s": load_s,
        **memory.stop(),
        "tokens": sum(len(ids) for ids in tokens.input_ids),
        "ez_score": [float(r["ez_score"]) for r in rows],
        "ez_status": [str(r["ez_status"]) for r in rows],
    }


def _baseline_scores(spec: dict, texts: list[str], dtype: str) -> tuple[dict, list[float]]:
    """Load both models the reference code's way, warm up, then time scoring ``texts``."""
    started = time.perf_counter()
    device = torch.device(spec["device"])
    models = baseline.load_models(
        Path(spec["target"]), Path(spec["base"]), spec["adapter"], str(device), dtype
    )
    tokenizer = load_tokenizer(Path(spec["base"]))
    score = functools.partial(
        baseline.compute_ez_scores,
        tokenizer,
        *models,
        device=str(device),
        sequence_length=spec["max_length"],
        logprob_dtype=getattr(torch, dtype if dtype == "float64" else "float32"),
    )
    score(texts[:1])
    load_s = time.perf_counter() - started
    memory = PeakMemory(device)
    memory.start()
    with Timer(device) as timer:
        scores = score(texts)
    return {**timer.figures, "load_s": load_s, **memory.stop()}, scores


def run_baseline(spec: dict, texts: list[str]) -> dict:
    """Score ``texts`` with the reference code's path."""
    figures, scores = _baseline_scores(spec, texts, spec["dtype"])
    return {**figures, "ez_score": scores}


def run_oracle(spec: dict, texts: list[str]) -> dict:
    """The reference code's path in float64 on the first few texts."""
    figures, scores = _baseline_scores(spec, texts[: spec["oracle_sequences"]], "float64")
    return {**figures, "ez_score": scores}


PATHS = {"ezmia": run_ezmia, "baseline": run_baseline, "oracle": run_oracle}


def main(spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    texts = json.loads(Path(spec["texts"]).read_text())
    result = PATHS[spec["path"]](spec, texts)
    Path(out_file).write_text(json.dumps({**spec, **result}))


if __name__ == "__main__":
    main(*sys.argv[1:])
