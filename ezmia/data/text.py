"""Turning texts into the token ids both passes score."""

from __future__ import annotations

import functools
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ezmia.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(path: Path):
    """The fast tokenizer saved with a checkpoint. Loaded once per process while the files in
    its folder keep their sizes and modification times (an audit checks it, then uses it), so
    callers share it: never modify the object returned."""
    try:
        stamp = tuple(
            sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path))
        )
    except OSError:  # not a folder: transformers says why below
        stamp = ()
    return _loaded_tokenizer(str(path), stamp)


def _read_tokenizer(path: str, stamp: tuple) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path``; ``stamp`` (its files' sizes and times) only keys the cache."""
    from transformers import AutoTokenizer

    try:  # a tokenizer's own code (auto_map) never runs, and is never asked about
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{path}: cannot load the tokenizer ({err})") from err
    if not tokenizer.is_fast:
        raise ModelError(f"{path}: ezmia needs a fast (Rust) tokenizer; found a slow one")
    return tokenizer


# Wrapped rather than decorated: mutation testing (mutmut) skips decorated functions.
_loaded_tokenizer = functools.lru_cache(maxsize=8)(_read_tokenizer)


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a batch of texts and the per-row facts the scores need."""

    input_ids: list[list[int]]
    truncated: list[bool]
    zlib_size: list[int]
    text_sha256: list[str | None]


def text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize(tokenizer, texts: list[str | None], max_length: int) -> Tokenized:
    """Tokenize without special tokens, truncating to ``max_length`` tokens.

    Null, empty and whitespace-only texts give no tokens. ``zlib_size`` is the compressed
    size of the part of the text that was kept.
    """
    present = [i for i, t in enumerate(texts) if t is not None and t.strip()]
    ids: list[list[int]] = [[] for _ in texts]
    truncated = [False] * len(texts)
    zlib_size = [0] * len(texts)
    if present:
        encoded = tokenizer(
            [texts[i] for i in present],
            add_special_tokens=False,
            truncation=True,
            max_length=max_length + 1,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for i, row_ids, offsets in zip(
            present, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            text = texts[i]
            assert text is not None
            if len(row_ids) > max_length:
                truncated[i] = True
                row_ids = row_ids[:max_length]
                text = text[: offsets[max_length - 1][1]]
            ids[i] = list(row_ids)
            zlib_size[i] = len(zlib.compress(text.encode("utf-8")))
    return Tokenized(ids, truncated, zlib_size, [text_hash(t) for t in texts])
