"""The demo's corpus of source chunks and the table it prints: rates the non-members do not
resolve print as "n/r", the headline uses the lowest rate they resolve, and each audit's
blind baseline and epsilon bound are shown."""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ezmia.demo.build import DEMO_COUNTS, build_key
from ezmia.demo.corpus import _SKIP_DIRS, _file_chunks, collect_code_chunks, split_corpus
from ezmia.demo.run import headline, table
from ezmia.demo.train import DEMO_SIZES
from ezmia.report.model import SummaryData
from ezmia.report.summary import build_summary
from ezmia.stats.blind import blind_baseline, text_features
from ezmia.stats.metrics import min_nonmembers
from ezmia.stats.scores import EZ_OK, SCORE_COLUMNS

N = 250  # rows per class of the blind-baseline checks


@pytest.fixture(scope="module")
def chunks() -> list[str]:
    return collect_code_chunks()


def test_code_chunks_are_runs_of_whole_source_lines_unique_and_bounded(chunks):
    assert len(chunks) == len(set(chunks)) > sum(DEMO_COUNTS.values())
    assert all(len(c) >= 200 and c == c.strip("\n") and "\n\n\n" not in c for c in chunks)
    multi_line = [c for c in chunks if "\n" in c]
    assert len(multi_line) > 0.99 * len(chunks)
    assert all(len(c) <= 360 for c in multi_line)  # a longer chunk is one long line
    path = Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py"
    source = "\n".join(line.rstrip() for line in path.read_text().splitlines())
    source = "\n" + re.sub(r"\n{3,}", "\n\n", source) + "\n"
    assert all(f"\n{chunk}\n" in source for chunk in _file_chunks(path, 360))
    assert collect_code_chunks() == chunks


def test_the_demo_resolves_a_tpr_at_0_1pct_fpr_and_fits_the_corpus(chunks):
    assert DEMO_COUNTS["n_nonmembers"] >= min_nonmembers(0.001)
    split = split_corpus(chunks, **DEMO_COUNTS, seed=0)
    assert len(split.nonmembers) == DEMO_COUNTS["n_nonmembers"]
    assert not set(split.members) & set(split.nonmembers)


def test_the_corpus_is_part_of_the_build_key_and_docstring_keys_are_unchanged():
    counts = (100, 50, 50)
    docstrings = build_key(DEMO_SIZES, *counts, seed=0)
    assert build_key(DEMO_SIZES, *counts, seed=0, corpus="docstrings") == docstrings
    assert build_key(DEMO_SIZES, *counts, seed=0, corpus="code") != docstrings


def labels(n_members: int, n_nonmembers: int) -> np.ndarray:
    return np.array([True] * n_members + [False] * n_nonmembers)


def test_a_random_split_of_the_code_chunks_is_not_distinguishable(chunks):
    texts = random.Random(1).sample(chunks, 2 * N)
    result = blind_baseline(text_features(texts), labels(N, N), bootstrap_rounds=100)
    assert abs(result["auc"] - 0.5) < 0.08
    assert result["distinguishable"] is False


def test_code_chunks_split_by_module_are_flagged():
    root = Path(sysconfig.get_paths()["stdlib"])
    by_module: dict[bool, list[str]] = {True: [], False: []}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not _SKIP_DIRS.intersection(parts[:-1]):
            by_module[parts[0] < "m"] += [c for c in _file_chunks(path, 360) if len(c) >= 200]
    rng = random.Random(1)
    texts = rng.sample(by_module[True], N) + rng.sample(by_module[False], N)
    result = blind_baseline(text_features(texts), labels(N, N), bootstrap_rounds=100)
    assert result["distinguishable"] is True and result["auc_ci95"][0] > 0.5


def summary(n_members: int, n_nonmembers: int, shift: float, blind: dict | None) -> SummaryData:
    """A leakage summary of synthetic scores: members shifted up by ``shift``."""
    rng = np.random.default_rng(0)
    is_member = labels(n_members, n_nonmembers)
    n = len(is_member)
    columns = {name: rng.normal(size=n) + shift * is_member for name in SCORE_COLUMNS}
    scores = pa.table({**columns, "ez_status": [EZ_OK] * n, "is_member": is_member})
    return build_summary(scores, mode="leakage", bootstrap_rounds=20, seed=0, detection=None,
                         blind=blind)  # fmt: skip


def test_the_table_prints_unresolved_rates_as_nr_and_the_blind_auc_and_epsilon():
    blind = blind_baseline(text_features([f"w{i % 7} x" for i in range(200)]), labels(100, 100),
                           bootstrap_rounds=20)  # fmt: skip
    summaries = {"full": summary(300, 1000, 3.0, blind), "lora": summary(300, 200, 0.5, None)}
    printed = table(summaries).splitlines()
    ez = next(line for line in printed if line.startswith("EZ-MIA"))
    full, lora = ez.split(" | ")[1:]
    assert "n/r" not in full and lora.split()[-1] == "n/r"
    assert lora.split()[1].endswith("%")  # 200 non-members resolve 1%
    blind_line = next(line for line in printed if line.startswith("blind AUC"))
    assert f"{blind['auc']:.3f}" in blind_line.split(" | ")[1]
    assert blind_line.split(" | ")[2].strip() == "n/a"
    epsilon_line = next(line for line in printed if line.startswith("epsilon >"))
    bound = summaries["full"].privacy.epsilon_lower_bound
    assert bound > 1 and f"{bound:.2f}" in epsilon_line.split(" | ")[1]


def test_the_headline_uses_the_lowest_rate_every_audit_resolves():
    both = {"full": summary(300, 1000, 3.0, None), "lora": summary(300, 1000, 0.5, None)}
    assert headline(both).startswith("At 0.1% false positives (the lowest rate 1000 non-members")
    one = {"full": summary(300, 1000, 3.0, None), "lora": summary(300, 200, 0.5, None)}
    first = headline(one).splitlines()[0]
    assert first.startswith("At 1.0% false positives (the lowest rate 200 non-members")
    tp = one["full"].metrics["ez_score"].operating_points["tpr_at_1pct_fpr"].tpr
    assert f"{tp:.1%} of full's" in first
    assert "full: HIGH:" in headline(one)
