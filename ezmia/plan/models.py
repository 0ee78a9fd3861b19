"""Pairing the target with its reference into a ``ModelPlan``, and loading the models it
names. A target is either a full checkpoint or a PEFT LoRA adapter (``adapter_config.json``); an
adapter is scored on one copy of its base, which is also the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ezmia.errors import EzmiaError, InputError, ModelError, one_line
from ezmia.plan.checks import (
    TOKENIZER_EXTRA_FILES,
    TOKENIZER_FILES,
    adapter_base,
    check_adapter_fits,
    check_checkpoint,
    check_same_tokenizer,
    check_same_vocab,
    has_tokenizer,
)
from ezmia.plan.fetch import (
    COMPLETE,
    PICKLE_WEIGHTS,
    SAFE_WEIGHTS,
    cache_root,
    matching_files,
    resolve_model_dir,
    staged_entry,
)


@dataclass(frozen=True)
class ModelPlan:
    """Which directories to load: ``target`` is a full checkpoint or an adapter on
    ``reference``; ``tokenizer`` is the directory whose tokenizer both passes share.
    ``sources`` maps each of the three to the location it was resolved from (local path, S3
    URI or hub id), so another node can fetch the same models without planning again."""

    target: Path
    reference: Path
    target_is_adapter: bool
    tokenizer: Path
    fingerprints: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def fingerprint(path: Path, cache_dir: str | Path | None = None) -> str:
    """The identity of a checkpoint's config and weight files, from what is already known:
    an S3 download's listing (keys, ETags, sizes), else each file's SHA-256, computed once per
    path, size and modification time and cached."""
    listing = path / COMPLETE
    if listing.exists():  # an S3 download records its listing
        return hashlib.sha256(listing.read_bytes()).hexdigest()[:32]
    digest = hashlib.sha256()
    for file in matching_files(path, ("*.json", *SAFE_WEIGHTS, *PICKLE_WEIGHTS)):
        digest.update(file.name.encode())
        digest.update(_file_hash(file, cache_root(cache_dir) / "fingerprints"))
    return digest.hexdigest()[:32]


def _file_hash(file: Path, cache: Path) -> bytes:
    """SHA-256 of a file's content, cached under its resolved path, size and mtime."""
    stat = file.stat()
    key = f"{file.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}"
    entry = cache / hashlib.sha256(key.encode()).hexdigest()[:32]
    with contextlib.suppress(OSError, ValueError):
        return bytes.fromhex(entry.read_text())
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash next time
        cache.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{entry.name}.", dir=cache)  # a new file
        with os.fdopen(fd, "w") as handle:
            os.fchmod(fd, 0o644)
            handle.write(digest.hexdigest())
        os.replace(staging, entry)
    return digest.digest()


def plan_models(
    target: str,
    reference: str | None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    weights: bool = True,
) -> ModelPlan:
    """Resolve, check and pair the target with its reference. Without ``weights`` (a Ray
    driver, which plans but never loads), S3 models are fetched without their weights."""
    safety = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    target_dir = resolve_model_dir(target, cache_dir, weights)
    is_adapter = check_checkpoint(target_dir, **safety)
    if reference is None:
        if not is_adapter:
            raise InputError(
                f"{target}: a full checkpoint needs --reference (the base model it was "
                "fine-tuned from)"
            )
        reference = adapter_base(target_dir)
        try:
            reference_dir = resolve_model_dir(reference, cache_dir, weights)
        except EzmiaError as err:
            raise ModelError(
                f"{target}: the adapter's base {reference} (base_model_name_or_path in "
                f"adapter_config.json) is not available ({err}); pass --reference"
            ) from err
    else:
        reference_dir = resolve_model_dir(reference, cache_dir, weights)
    if check_checkpoint(reference_dir, **safety):
        raise InputError(f"{reference}: the reference must be a full checkpoint, not an adapter")
    tokenizer_dir = target_dir if has_tokenizer(target_dir) else reference_dir
    if not has_tokenizer(tokenizer_dir):
        raise ModelError(f"{target}: no tokenizer files in the target or the reference")
    if is_adapter:
        check_adapter_fits(target_dir, reference_dir)
    else:
        check_same_vocab(target_dir, reference_dir)
    if has_tokenizer(reference_dir) and tokenizer_dir != reference_dir:
        check_same_tokenizer(tokenizer_dir, reference_dir)
    return ModelPlan(
        target=target_dir,
        reference=reference_dir,
        target_is_adapter=is_adapter,
        tokenizer=tokenizer_dir,
        fingerprints={
            "target": fingerprint(target_dir, cache_dir),
            "reference": fingerprint(reference_dir, cache_dir),
        },
        sources={
            "target": target,
            "reference": reference,
            "tokenizer": target if tokenizer_dir == target_dir else reference,
        },
    )


def context_length(plan: ModelPlan) -> int | None:
    """The longest sequence the reference architecture accepts, when its config says."""
    config = json.loads((plan.reference / "config.json").read_text())
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def load_causal_lm(
    path: Path, *, dtype, device, allow_pickle: bool, trust_remote_code: bool, spread: bool = False
):
    """A transformers causal LM in eval mode on ``device``; with ``spread`` and more than one
    visible CUDA GPU, its layers split over all of them (``device_map="auto"``)."""
    import torch
    from transformers import AutoModelForCausalLM

    use_safetensors = True if matching_files(path, SAFE_WEIGHTS) or not allow_pickle else None
    placement: dict = {}
    if spread and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        gpus = range(torch.cuda.device_count())
        placement = {
            "device_map": "auto",
            "max_memory": {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in gpus},
        }
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
            **placement,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"{path}: cannot load the model ({err})") from err
    return (model if placement else model.to(device)).eval()


def attach_adapter(base_model, adapter_dir: Path):
    """Wrap ``base_model`` with the LoRA adapter; the adapter can later be disabled for the
    reference pass so both passes share one copy of the base weights."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        reason = one_line(err, 300)
        raise ModelError(
            f"{adapter_dir}: the adapter does not fit the reference model ({reason}); pass the "
            "base model it was trained on as --reference"
        ) from err


def merged_adapter_dir(plan: ModelPlan, cache_dir: str | Path | None = None) -> Path:
    """The adapter merged into a copy of its base, saved as safetensors in the cache."""
    import torch

    key = hashlib.sha256(
        f"{plan.fingerprints.get('target')}:{plan.fingerprints.get('reference')}".encode()
    ).hexdigest()[:24]
    out = cache_root(cache_dir) / "merged" / key
    if (out / COMPLETE).exists():
        return out
    base = load_causal_lm(
        plan.reference,
        dtype=torch.float32,
        device="cpu",
        allow_pickle=False,
        trust_remote_code=False,
    )
    merged = attach_adapter(base, plan.target).merge_and_unload()
    with staged_entry(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        for name in TOKENIZER_FILES + TOKENIZER_EXTRA_FILES:
            if (plan.tokenizer / name).exists():
                shutil.copy(plan.tokenizer / name, staging / name)
        (staging / COMPLETE).write_text(key)
    return out
