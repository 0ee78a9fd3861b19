"""How far bf16 moves EZ scores, statuses and AUC against fp32, on trained demo models:

    .venv/bin/python benchmarks/bf16_drift.py [--device cpu] [--out DIR]

Builds (or reuses, in ``.cache/test-models``) the tests' demo: a tiny GPT-2 trained on stdlib
docstrings, fine-tuned in full and with LoRA on 60 members, with 60 held-out non-members. Both
targets score the labelled eval set through ``TorchBackend`` in float32 and in bfloat16.
Results go to ``bf16_drift.json`` under ``--out`` (default: ``$OUT`` or ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def score(models: dict, texts: list[str], device: str, dtype: str) -> tuple[np.ndarray, list[str]]:
    """EZ scores and statuses of ``texts`` through the benchmark's ezmia path in ``dtype``
    (``models``: ``target`` and ``base`` directories)."""
    from benchmarks.paths import ezmia_path

    spec = {**models, "device": device, "dtype": dtype, "batch_size": 16, "max_length": 128}
    result = ezmia_path(spec)[1](texts)
    return np.array(result["ez_score"]), result["ez_status"]


def drift(models: dict, texts: list[str], labels: np.ndarray, device: str) -> dict:
    """fp32 against bf16 on one target."""
    from ezmia.stats.metrics import point_metrics

    (fp32, status32), (bf16, status16) = (
        score(models, texts, device, dtype) for dtype in ("float32", "bfloat16")
    )
    return {
        "max_abs_score_diff": float(np.abs(fp32 - bf16).max()),
        "median_abs_score_diff": float(np.median(np.abs(fp32 - bf16))),
        "status_changes": sum(a != b for a, b in zip(status32, status16, strict=True)),
        "rank_correlation": float(
            np.corrcoef(fp32.argsort().argsort(), bf16.argsort().argsort())[0, 1]
        ),
        "float32": point_metrics(labels, fp32),
        "bfloat16": point_metrics(labels, bf16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import pyarrow.parquet as pq

    from ezmia.demo.build import build_demo_artifacts
    from tests.sizes import TEST_COUNTS, TEST_SIZES

    demo = build_demo_artifacts(REPO / ".cache" / "test-models", TEST_SIZES, **TEST_COUNTS)
    table = pq.read_table(demo.eval)
    texts, labels = table.column("text").to_pylist(), np.array(table.column("is_member"))
    results = {
        kind: drift({"target": str(target), "base": str(demo.base)}, texts, labels, args.device)
        for kind, target in (("full", demo.full), ("lora", demo.lora))
    }
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks")
    (out / "bf16_drift.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
