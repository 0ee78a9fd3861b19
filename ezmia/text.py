"""Turning texts into the token ids both passes score."""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from ezmia.errors import ModelError
from ezmia.models import ModelPlan


def load_tokenizer(path: Path):
    """The fast tokenizer saved with a checkpoint."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{path}: cannot load the tokenizer ({err})") from err
    if not tokenizer.is_fast:
        raise ModelError(f"{path}: ezmia needs a fast (Rust) tokenizer; found a slow one")
    return tokenizer


def vocab_sizes(plan: ModelPlan) -> list[tuple[Path, int]]:
    """The ``vocab_size`` of each scored model's config.json (an adapter scores on its
    reference's), where the config says."""
    dirs = [plan.reference] if plan.target_is_adapter else [plan.target, plan.reference]
    sizes = []
    for directory in dirs:
        file = directory / "config.json"
        config = json.loads(file.read_text())
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if isinstance(size, int):
            sizes.append((file, size))
    return sizes


def check_vocabulary(plan: ModelPlan) -> None:
    """Refuse a tokenizer that can produce token ids (added tokens included) beyond either
    model's vocabulary, before any model loads."""
    vocab = load_tokenizer(plan.tokenizer).get_vocab()
    if not vocab:
        return
    token, top = max(vocab.items(), key=lambda item: item[1])
    source = plan.tokenizer / "tokenizer.json"
    source = source if source.exists() else plan.tokenizer
    for config, size in vocab_sizes(plan):
        if top >= size:
            raise ModelError(
                f"{source}: the tokenizer can produce token ids up to {top} ({token!r}), but "
                f"{config} has vocab_size {size} (ids 0 to {size - 1}): use the tokenizer the "
                "model was trained with, or resize the model's embeddings to the tokenizer "
                "(resize_token_embeddings) and save it again"
            )


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
