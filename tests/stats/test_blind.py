"""The blind baseline tells a split by source from a random one, from the texts alone."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ezmia.demo.corpus import _SKIP_DIRS, _file_docstrings, collect_docstrings
from ezmia.stats.blind import AUC_LIMIT, blind_baseline, text_features

N = 250  # rows per class


@pytest.fixture(scope="module")
def docstrings_by_package() -> list[tuple[str, str]]:
    """(top-level stdlib module, docstring) of every docstring of 200+ characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not _SKIP_DIRS.intersection(parts[:-1]):
            found += [(parts[0], d) for d in _file_docstrings(path) if len(d) >= 200]
    return found


def labels(n_members: int, n_nonmembers: int) -> np.ndarray:
    return np.array([True] * n_members + [False] * n_nonmembers)


def test_a_random_split_of_one_corpus_is_not_distinguishable():
    texts = random.Random(1).sample(collect_docstrings(), 2 * N)
    result = blind_baseline(text_features(texts), labels(N, N), bootstrap_rounds=100)
    assert abs(result["auc"] - 0.5) < 0.08
    assert result["distinguishable"] is False


def test_a_split_by_source_is_flagged(docstrings_by_package):
    rng = random.Random(1)
    first = rng.sample([d for m, d in docstrings_by_package if m < "m"], N)
    second = rng.sample([d for m, d in docstrings_by_package if m >= "m"], N)
    result = blind_baseline(text_features(first + second), labels(N, N), bootstrap_rounds=100)
    assert result["auc"] > AUC_LIMIT + 0.05
    assert result["auc_ci95"][0] > 0.5
    assert result["distinguishable"] is True
    assert result["n"] == 2 * N


def test_texts_that_differ_only_in_a_marker_word_are_told_apart_perfectly():
    texts = [f"alpha record {i}" for i in range(20)] + [f"omega record {i}" for i in range(20)]
    result = blind_baseline(text_features(texts), labels(20, 20), bootstrap_rounds=0)
    assert result["auc"] == 1.0 and result["distinguishable"] is True
    assert result["auc_ci95"] is None


def test_a_class_with_fewer_than_two_rows_has_no_blind_baseline():
    assert blind_baseline(text_features(["a", "b", "c"]), labels(1, 2), bootstrap_rounds=0) is None
