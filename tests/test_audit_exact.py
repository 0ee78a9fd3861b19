"""Audits of small fixtures whose every output value is known beforehand: per-id labels, ids,
``source_row``, EZ status and every score, computed independently (full-vocabulary
log-softmax in float64, straight from shared/EZMIA.md) from the same texts."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from ezmia.cli import main
from ezmia.data.text import load_tokenizer
from tests.reference_ez import naive_ez

MAX_LENGTH = 72
"""Eval texts of 72 tokens are kept whole; the 73-token ones are cut by one token."""


@pytest.fixture(scope="module")
def texts(models) -> list[str]:
    """20 texts: eval texts of every size class around ``MAX_LENGTH`` (members and
    non-members), long ones, and 3-, 2-, 1- and 0-token texts."""
    rows = pq.read_table(models.eval).to_pylist()
    tokenizer = load_tokenizer(models.tokenizer)
    sizes = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    exact = [r["text"] for r, n in zip(rows, sizes, strict=True) if n == MAX_LENGTH][:2]
    over = [r["text"] for r, n in zip(rows, sizes, strict=True) if n == MAX_LENGTH + 1][:2]
    long = [r["text"] for r, n in zip(rows, sizes, strict=True) if n > 100][:12]
    assert (len(exact), len(over), len(long)) == (2, 2, 12)
    return [*exact, *over, *long[:6], "the cat", "Return the", "x", "", *long[6:]]


def _log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def expected_row(target, reference, tokenizer, text: str) -> dict[str, object]:
    """Every score column of one text, from the definitions (one position per loop step)."""
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = all_ids[:MAX_LENGTH]
    kept = tokenizer.decode(ids)
    ez, status = naive_ez(target, reference, ids)
    row: dict[str, object] = {
        "ez_score": ez,
        "ez_status": status,
        "n_tokens": len(ids),
        "n_scored": max(len(ids) - 1, 0),
        "truncated": len(all_ids) > MAX_LENGTH,
    }
    if len(ids) < 2:
        return {**row, **dict.fromkeys(("loss", "ref_ratio", "zlib", "min_k", "min_k_pp"), None)}
    lt, lr = _log_probs(target, ids), _log_probs(reference, ids)
    lp_t = [float(lt[t - 1, ids[t]]) for t in range(1, len(ids))]
    lp_r = [float(lr[t - 1, ids[t]]) for t in range(1, len(ids))]
    z = []
    for t in range(1, len(ids)):
        p = lt[t - 1].exp()
        mu = float((p * lt[t - 1]).sum())
        sigma = math.sqrt(float((p * (lt[t - 1] - mu) ** 2).sum()))
        z.append((lp_t[t - 1] - mu) / sigma)
    k = max(1, len(lp_t) // 5)
    return {
        **row,
        "loss": sum(lp_t) / len(lp_t),
        "ref_ratio": sum(lp_t) / len(lp_t) - sum(lp_r) / len(lp_r),
        "zlib": sum(lp_t) / len(lp_t) / len(zlib.compress(kept.encode("utf-8"))),
        "min_k": sum(sorted(lp_t)[:k]) / k,
        "min_k_pp": sum(sorted(z)[:k]) / k,
    }


@pytest.fixture(scope="module")
def expected(models, texts) -> dict[str, dict[str, object]]:
    target = AutoModelForCausalLM.from_pretrained(models.full).eval()
    reference = AutoModelForCausalLM.from_pretrained(models.base).eval()
    tokenizer = load_tokenizer(models.tokenizer)
    return {text: expected_row(target, reference, tokenizer, text) for text in set(texts)}


def labels_of(texts: list[str]) -> list[bool]:
    """Alternating members and non-members."""
    return [i % 2 == 0 for i in range(len(texts))]


def write(path: Path, columns: dict, row_group_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def run(models, out: Path, *data_flags: str) -> pa.Table:
    args = [
        "audit", "--target", str(models.full), "--reference", str(models.base), *data_flags,
        "--out", str(out), "--max-length", str(MAX_LENGTH), "--bootstrap-rounds", "0",
        "--engine", "local",
    ]  # fmt: skip
    assert main(args) == 0
    return pq.read_table(out / "scores").sort_by("source_row")


def assert_exact(scores: pa.Table, texts, labels, ids, expected) -> None:
    """Row ``i`` of the sources: id ``ids[i]``, ``source_row`` i, label ``labels[i]`` and the
    expected scores of ``texts[i]``."""
    got = scores.to_pylist()
    assert [r["source_row"] for r in got] == list(range(len(texts)))
    assert [r["id"] for r in got] == ids
    assert {r["id"]: r["is_member"] for r in got} == dict(zip(ids, labels, strict=True))
    for row, text in zip(got, texts, strict=True):
        want = expected[text]
        assert row["ez_status"] == want["ez_status"], text
        assert row["ez_score"] == pytest.approx(want["ez_score"], rel=1e-5, abs=1e-9), text
        for name in ("n_tokens", "n_scored", "truncated"):
            assert row[name] == want[name], (name, text)
        for name in ("loss", "ref_ratio", "zlib", "min_k", "min_k_pp"):
            if want[name] is None:
                assert math.isnan(row[name]), (name, text)
            else:
                assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), (name, text)


def test_the_fixture_covers_every_length_class(texts, expected):
    statuses = {expected[t]["ez_status"] for t in texts}
    assert {"ok", "too_short", "empty"} <= statuses
    assert [expected[t]["truncated"] for t in texts[:4]] == [False, False, True, True]
    assert [expected[t]["n_tokens"] for t in texts[10:14]] == [3, 2, 1, 0]


def test_integer_labels_and_an_id_column_over_several_row_groups(models, texts, expected, tmp_path):
    labels = labels_of(texts)
    ids = [f"doc-{i:02d}" for i in range(len(texts))]
    columns = {"doc": ids, "body": texts, "member": pa.array([int(v) for v in labels], pa.int64())}
    write(tmp_path / "data.parquet", columns, row_group_size=6)
    scores = run(
        models, tmp_path / "out", "--data", str(tmp_path / "data.parquet"),
        "--id-column", "doc", "--text-column", "body", "--label-column", "member",
    )  # fmt: skip
    assert_exact(scores, texts, labels, ids, expected)


def test_boolean_labels_over_several_files_without_an_id_column(models, texts, expected, tmp_path):
    """Without an id column the ids are the row index over all files in order."""
    labels = [not label for label in labels_of(texts)]
    write(tmp_path / "d" / "a.parquet", {"text": texts[:11], "y": labels[:11]}, 4)
    write(tmp_path / "d" / "b.parquet", {"text": texts[11:], "y": labels[11:]}, 5)
    scores = run(models, tmp_path / "out", "--data", str(tmp_path / "d"), "--label-column", "y")
    assert_exact(scores, texts, labels, list(range(len(texts))), expected)


def test_member_and_non_member_files_give_global_ids_and_file_labels(
    models, texts, expected, tmp_path
):
    members, nonmembers = texts[:9], texts[9:]
    write(tmp_path / "m" / "part-0.parquet", {"text": members[:5]}, 2)
    write(tmp_path / "m" / "part-1.parquet", {"text": members[5:]}, 4)
    write(tmp_path / "n.parquet", {"text": nonmembers}, 4)
    scores = run(
        models, tmp_path / "out",
        "--members", str(tmp_path / "m"), "--nonmembers", str(tmp_path / "n.parquet"),
    )  # fmt: skip
    labels = [True] * len(members) + [False] * len(nonmembers)
    assert_exact(scores, texts, labels, list(range(len(texts))), expected)


def test_detection_does_not_flag_candidates_scoring_exactly_the_threshold(
    models, texts, expected, tmp_path
):
    """Calibration scores 0, 0, 0 and one positive EZ score: the 50% quantile is exactly 0,
    which every too-short candidate scores; only candidates strictly above are flagged."""
    positive = [t for t in texts if expected[t]["ez_status"] == "ok" and expected[t]["ez_score"]]
    write(tmp_path / "cal.parquet", {"text": ["x", "Return the", "", positive[0]]}, 4)
    candidates = ["x", "Return the", *positive[1:4]]
    write(tmp_path / "cand.parquet", {"text": candidates}, 5)
    flags = [
        "--data",
        str(tmp_path / "cand.parquet"),
        "--calibration",
        str(tmp_path / "cal.parquet"),
    ]
    scores = run(models, tmp_path / "out", *flags, "--fpr", "0.5")
    assert scores.column("flagged").to_pylist() == [False, False, True, True, True]
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["detection"]["threshold"] == 0.0
    assert (data["detection"]["n_flagged"], data["detection"]["n_calibration"]) == (3, 4)
    np.testing.assert_allclose(
        scores.column("ez_score").to_numpy(),
        [expected[t]["ez_score"] for t in candidates],
        rtol=1e-5,
    )
