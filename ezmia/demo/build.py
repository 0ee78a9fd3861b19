"""Build (or reuse from a cache) the complete offline demo: tokenizer, base, targets, data."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ezmia.demo.corpus import collect_code_chunks, collect_docstrings, split_corpus
from ezmia.demo.train import ModelSizes, finetune, set_adapter_base, train_base, train_tokenizer

BUILD_VERSION = 1
COMPLETE_MARKER = "_COMPLETE"
CORPORA: dict[str, Callable[[], list[str]]] = {
    "docstrings": collect_docstrings,  # >= 2000 texts of >= 200 characters in every stdlib
    "code": collect_code_chunks,  # >= 20000 chunks of ~128 tokens
}
# The demo: 1000 non-members resolve a TPR at 0.1% FPR; members, non-members and the base's
# pretraining texts are a random split of one pool of source chunks (a split by module would
# be told apart from the text alone, and the blind baseline would rightly flag it).
DEMO_CORPUS = "code"
DEMO_COUNTS = {"n_pretrain": 4000, "n_members": 1000, "n_nonmembers": 1000}


@dataclass(frozen=True)
class DemoArtifacts:
    """Paths of a finished demo build.

    ``base``/``full`` are complete HF checkpoints, ``lora`` an adapter on ``base``.
    ``members``/``nonmembers`` are Parquet files with columns ``id``, ``text``; ``eval`` has
    both, shuffled, with an ``is_member`` bool column.
    """

    root: Path
    tokenizer: Path
    base: Path
    full: Path
    lora: Path
    members: Path
    nonmembers: Path
    eval: Path

    @classmethod
    def at(cls, root: Path) -> DemoArtifacts:
        """The layout of a build rooted at ``root``."""
        root = Path(root)
        return cls(
            root=root,
            tokenizer=root / "tokenizer",
            base=root / "base",
            full=root / "full",
            lora=root / "lora",
            members=root / "members.parquet",
            nonmembers=root / "nonmembers.parquet",
            eval=root / "eval.parquet",
        )


def _manifest(
    sizes: ModelSizes,
    n_pretrain: int,
    n_members: int,
    n_nonmembers: int,
    seed: int,
    corpus: str = "docstrings",
) -> dict[str, object]:
    manifest = {
        "sizes": asdict(sizes),
        "counts": {"pretrain": n_pretrain, "members": n_members, "nonmembers": n_nonmembers},
        "seed": seed,
        "python": platform.python_version(),
        "version": BUILD_VERSION,
    }
    if corpus != "docstrings":  # named only when not the first corpus: earlier keys stay valid
        manifest["corpus"] = corpus
    return manifest


def build_key(
    sizes: ModelSizes,
    n_pretrain: int,
    n_members: int,
    n_nonmembers: int,
    seed: int,
    corpus: str = "docstrings",
) -> str:
    """Short hash naming a build: sizes, counts, seed, corpus, Python version,
    ``BUILD_VERSION``."""
    manifest = _manifest(sizes, n_pretrain, n_members, n_nonmembers, seed, corpus)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _write_texts(path: Path, texts: Sequence[str], is_member: Sequence[bool] | None = None) -> None:
    ids = ["doc-" + hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]  # split unseen
    columns = {"id": pa.array(ids, pa.string()), "text": pa.array(texts)}
    if is_member is not None:
        columns["is_member"] = pa.array(is_member, pa.bool_())
    pq.write_table(pa.table(columns), path)


def build_demo_artifacts(
    cache_dir: Path,
    sizes: ModelSizes,
    n_pretrain: int,
    n_members: int,
    n_nonmembers: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
    corpus: str = "docstrings",
) -> DemoArtifacts:
    """Build the demo into ``cache_dir/<key>/``, or return it at once if already complete.

    ``corpus`` names the texts (``CORPORA``) split into pretraining data, members and
    non-members. The build happens in a temporary sibling directory that is renamed into place
    after ``_COMPLETE`` is written, so an interrupted build is never reused.
    """
    cache_dir = Path(cache_dir).resolve()
    if corpus not in CORPORA:
        raise ValueError(f"unknown demo corpus {corpus!r}: one of {', '.join(CORPORA)}")
    key = build_key(sizes, n_pretrain, n_members, n_nonmembers, seed, corpus)
    final = DemoArtifacts.at(cache_dir / key)
    if (final.root / COMPLETE_MARKER).exists():
        log(f"demo: reusing {final.root}")
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = DemoArtifacts.at(Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models train 3-8x faster on one thread than on two busy cores
    try:
        _build(tmp, sizes, n_pretrain, n_members, n_nonmembers, seed, corpus, log)
        set_adapter_base(tmp.lora, final.base)
        (tmp.root / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))
        tmp.root.chmod(0o755)  # mkdtemp made it private
        if final.root.exists() and not (final.root / COMPLETE_MARKER).exists():
            shutil.rmtree(final.root)  # debris from a foreign or manual partial copy
        try:
            os.rename(tmp.root, final.root)
        except OSError:
            if not (final.root / COMPLETE_MARKER).exists():
                raise
            log(f"demo: a concurrent build finished first; using {final.root}")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp.root, ignore_errors=True)
    log(f"demo: ready at {final.root}")
    return final


def _build(
    out: DemoArtifacts,
    sizes: ModelSizes,
    n_pretrain: int,
    n_members: int,
    n_nonmembers: int,
    seed: int,
    corpus: str,
    log: Callable[[str], None],
) -> None:
    start = time.monotonic()
    manifest = _manifest(sizes, n_pretrain, n_members, n_nonmembers, seed, corpus)
    (out.root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def step(message: str) -> None:
        log(f"demo: [{time.monotonic() - start:5.1f}s] {message}")

    step(f"collecting the stdlib's {corpus}")
    splits = split_corpus(CORPORA[corpus](), n_pretrain, n_members, n_nonmembers, seed)
    _write_texts(out.members, splits.members)
    _write_texts(out.nonmembers, splits.nonmembers)
    labelled = [(t, True) for t in splits.members] + [(t, False) for t in splits.nonmembers]
    random.Random(seed).shuffle(labelled)
    _write_texts(out.eval, [t for t, _ in labelled], [m for _, m in labelled])
    step(f"training tokenizer (vocab {sizes.vocab_size}) on {n_pretrain} texts")
    train_tokenizer(splits.pretrain, sizes.vocab_size, out.tokenizer)
    step(f"pretraining base ({sizes.n_layer}x{sizes.n_embd}, {sizes.pretrain_epochs} epochs)")
    train_base(splits.pretrain, out.tokenizer, sizes, out.base, seed)
    step(f"full fine-tune on {n_members} members ({sizes.finetune_epochs} epochs)")
    finetune(out.base, splits.members, sizes, out.full, seed, lora=False)
    step(f"LoRA fine-tune on {n_members} members ({sizes.finetune_epochs} epochs)")
    finetune(out.base, splits.members, sizes, out.lora, seed, lora=True)
    step("done")
