"""Text corpora built offline from Python's standard library: its docstrings, and chunks of
its source code (the paper also audits code models)."""

from __future__ import annotations

import ast
import gc
import random
import re
import sysconfig
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class CorpusSplits:
    """Disjoint text splits: pretraining data for the base, fine-tune members, held-out."""

    pretrain: list[str]
    members: list[str]
    nonmembers: list[str]


def collect_docstrings(min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of the running interpreter's stdlib source.

    Files are parsed with ``ast`` (nothing is imported) in sorted path order; test suites,
    ``idlelib``, ``lib2to3`` and third-party packages are skipped. Docstrings shorter than
    ``min_chars`` after whitespace normalisation are dropped; duplicates keep first place.
    """
    docs = _unique_texts(None)
    return [doc for doc in docs if len(doc) >= min_chars]


def _file_docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    docs = (ast.get_docstring(n, clean=True) for n in ast.walk(tree) if isinstance(n, _DOC_NODES))
    return [_tidy(doc.strip().splitlines()) for doc in docs if doc]


@lru_cache(maxsize=4)
def _unique_texts(chunk_chars: int | None) -> tuple[str, ...]:
    """The distinct docstrings (``chunk_chars`` None) or code chunks of the stdlib sources,
    in sorted path order, each at its first place."""
    root = Path(sysconfig.get_paths()["stdlib"])
    read = _file_docstrings if chunk_chars is None else partial(_file_chunks, max_chars=chunk_chars)
    seen: dict[str, None] = {}
    gc_enabled = gc.isenabled()
    gc.disable()  # ASTs are millions of acyclic nodes: collecting them is wasted time
    try:
        for path in sorted(root.rglob("*.py")):
            if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
                continue
            seen.update(dict.fromkeys(read(path)))
    finally:
        if gc_enabled:
            gc.enable()
    return tuple(seen)


def collect_code_chunks(max_chars: int = 360, min_chars: int = 200) -> list[str]:
    """Chunks of the running interpreter's stdlib source: runs of whole lines of at most
    ``max_chars`` characters (about 128 tokens of the demo's tokenizer), each file cut on its
    own. The same files as ``collect_docstrings``, read in sorted path order; chunks shorter
    than ``min_chars`` after stripping are dropped; duplicates keep first place.
    """
    chunks = _unique_texts(max_chars)
    return [chunk for chunk in chunks if len(chunk) >= min_chars]


def _file_chunks(path: Path, max_chars: int) -> list[str]:
    try:
        lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (UnicodeDecodeError, OSError):
        return []
    chunks, current, size = [], [], 0
    for line in lines:
        if current and size + len(line) + 1 > max_chars:
            chunks.append(_tidy(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append(_tidy(current))
    return chunks


def _tidy(lines: list[str]) -> str:
    """Lines right-stripped and joined without blank lines at either end (indentation kept),
    runs of blank lines cut to one."""
    return re.sub(r"\n{3,}", "\n\n", "\n".join(map(str.rstrip, lines)).strip("\n"))


def split_corpus(
    texts: Sequence[str], n_pretrain: int, n_members: int, n_nonmembers: int, seed: int
) -> CorpusSplits:
    """Disjoint pretrain/member/nonmember splits from a seeded shuffle of ``texts``.

    Deterministic for the same ``texts``, sizes, seed and Python version. Raises
    ``ValueError`` when ``texts`` holds fewer than the requested total.
    """
    unique = list(dict.fromkeys(texts))
    need = n_pretrain + n_members + n_nonmembers
    if min(n_pretrain, n_members, n_nonmembers) < 0:
        raise ValueError(f"split sizes must be >= 0, got {n_pretrain}/{n_members}/{n_nonmembers}")
    if len(unique) < need:
        raise ValueError(
            f"corpus has {len(unique)} distinct texts, need {need} "
            f"(pretrain={n_pretrain}, members={n_members}, nonmembers={n_nonmembers})"
        )
    random.Random(seed).shuffle(unique)
    return CorpusSplits(
        pretrain=unique[:n_pretrain],
        members=unique[n_pretrain : n_pretrain + n_members],
        nonmembers=unique[n_pretrain + n_members : need],
    )
