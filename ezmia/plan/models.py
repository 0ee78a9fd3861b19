"""Finding, checking and loading the target and reference checkpoints.

A model is a local directory, an ``s3://`` prefix (downloaded once into a cache keyed by the
objects' ETags and verified against their sizes) or a hub id. A target is either a full
checkpoint or a PEFT LoRA adapter (``adapter_config.json``); an adapter is scored on one
copy of its base, which is also the reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ezmia.data import storage
from ezmia.data.text import load_tokenizer
from ezmia.errors import EzmiaError, InputError, ModelError

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "merges.txt", "added_tokens.json")
COMPLETE = ".ezmia-complete"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The model cache: ``cache_dir`` when given (``--cache-dir``), else ``$EZMIA_CACHE``,
    else ``~/.cache/ezmia``."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("EZMIA_CACHE", Path.home() / ".cache" / "ezmia"))


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


PROGRESS_BYTES = 100_000_000  # downloads log each file at least this big, and the last one
log = logging.getLogger(__name__)

HEADER = ".ezmia-header"
"""Suffix of a safetensors file's header (its JSON), fetched in place of the file for planning."""
HEADER_LISTING = ".ezmia-weights"  # a planning directory's list of the weights it lacks
MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size


def resolve_model_dir(uri: str, cache_dir: str | Path | None = None, weights: bool = True) -> Path:
    """A local directory holding the model at ``uri`` (downloading S3 or hub models once).
    Without ``weights``, an S3 model's directory holds its small files and each safetensors
    file's header only (``HEADER``; range requests): enough to plan and check, never to load."""
    cache = cache_root(cache_dir)
    if storage.is_s3(uri) and not weights:
        small = lambda rel: not is_weight_file(rel)  # noqa: E731
        return _download_s3_model(uri, cache / "plans", select=small, headers=True)
    if storage.is_s3(uri):
        return _download_s3_model(uri, cache / "models")
    path = Path(uri).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or uri.startswith((".", "/", "~")):
        raise InputError(f"{uri}: model path is not a directory (expected a checkpoint folder)")
    return _download_hub_model(uri, cache / "hub")


def is_weight_file(name: str) -> bool:
    """Whether a checkpoint file holds weights (the large files), by its name."""
    return any(fnmatch.fnmatch(name, p) for p in (*SAFE_WEIGHTS, *PICKLE_WEIGHTS))


def resolve_tokenizer_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the tokenizer of the model at ``uri``: for an S3 model only
    its small files (configs, tokenizer), downloaded once per machine; never its weights."""
    if storage.is_s3(uri):
        cache = cache_root(cache_dir) / "tokenizers"
        return _download_s3_model(uri, cache, select=lambda rel: not is_weight_file(rel))
    return resolve_model_dir(uri, cache_dir)


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a file beside a cache entry): processes of one machine
    that want the same entry wait for the first to fetch it, then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_s3_model(
    uri: str, cache: Path, select: Callable[[str], bool] | None = None, headers: bool = False
) -> Path:
    """Download every object under the prefix (those ``select`` accepts) once per machine,
    under a file lock that concurrent processes share; each file is checked against the
    listing's size and, for single-part uploads, its MD5 ETag. A cached copy is reused only
    while its files still have the listed sizes."""
    bucket, prefix = storage.split_s3(uri.rstrip("/") + "/")
    client = storage.s3_client()
    objects = []
    with storage.s3_errors(uri, "list the model prefix", ModelError):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
    if not objects:
        raise ModelError(f"{uri}: no objects under this model prefix (check the model path)")
    listing = sorted((o["Key"][len(prefix) :], o["ETag"], o["Size"]) for o in objects)
    files = [(rel, etag, size) for rel, etag, size in listing if rel and not rel.endswith("/")]
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:24]
    if select is not None:
        files = [f for f in files if select(f[0])]
    target = cache / key
    if _cached(target, files, headers):
        return target
    with _cache_lock(cache / f".{key}.lock"):
        if _cached(target, files, headers):
            return target  # another process fetched it while this one waited
        staging = cache / f".{key}.partial-{os.getpid()}-{threading.get_ident()}"
        _fetch(client, uri, bucket, prefix, files, staging)
        if headers:
            (staging / HEADER_LISTING).write_text(json.dumps([list(f) for f in listing]))
            for rel, _etag, size in listing:
                if fnmatch.fnmatch(rel, "*.safetensors"):
                    _fetch_header(client, bucket, prefix + rel, staging / (rel + HEADER), size)
        (staging / COMPLETE).write_text(json.dumps(listing))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _fetch(
    client, uri: str, bucket: str, prefix: str, files: list[tuple[str, str, int]], staging: Path
) -> None:
    """Download and verify ``files`` into ``staging`` (removed again on failure), logging
    each file with this machine's name and the bytes done so far."""
    shutil.rmtree(staging, ignore_errors=True)
    total, done = sum(size for _, _, size in files), 0
    host = socket.gethostname()
    try:
        for number, (rel, etag, size) in enumerate(files, 1):
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with storage.s3_errors(f"{uri.rstrip('/')}/{rel}", "download", ModelError):
                client.download_file(bucket, prefix + rel, str(dest))
            _verify_download(client, bucket, prefix + rel, dest, etag, size)
            done += size
            if size >= PROGRESS_BYTES or number == len(files):
                log.warning(
                    "model %s on %s: %d of %d files, %.2f of %.2f GB",
                    uri, host, number, len(files), done / 1e9, total / 1e9,
                )  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fetch_header(client, bucket: str, key: str, dest: Path, size: int) -> None:
    """Save a safetensors file's JSON header (two range requests), refusing a file too short
    for the header it announces."""
    uri = f"s3://{bucket}/{key}"
    with storage.s3_errors(uri, "read the header of", ModelError):
        first = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read()
        length = int.from_bytes(first, "little") if len(first) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            raise ModelError(
                f"{uri}: corrupt or truncated safetensors file (header of {length} bytes in "
                f"{size}); upload the checkpoint again"
            )
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{7 + length}")
        header = body["Body"].read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = header.decode("utf-8", "replace")
    dest.write_text(json.dumps({"size": size, "length": length, "header": text}))


def _cached(directory: Path, files: list[tuple[str, str, int]], headers: bool) -> bool:
    """Whether ``directory`` is a finished download of ``files``, each with its listed size,
    and (for planning) the weights' listing: an entry an older ezmia left without it is
    fetched again, not read as a checkpoint without weights."""
    if not (directory / COMPLETE).exists() or (
        headers and not (directory / HEADER_LISTING).exists()
    ):
        return False
    paths = ((directory / rel, size) for rel, _etag, size in files)
    return all(path.is_file() and path.stat().st_size == size for path, size in paths)


def _verify_download(client, bucket: str, key: str, dest: Path, etag: str, size: int) -> None:
    """Refuse a download whose size or (single-part, non-KMS) MD5 differs from the listing."""
    uri = f"s3://{bucket}/{key}"
    if dest.stat().st_size != size:
        raise ModelError(
            f"{uri}: downloaded {dest.stat().st_size} bytes, the listing says {size}; the "
            "download is corrupt, retry"
        )
    etag = etag.strip('"')
    if not re.fullmatch(r"[0-9a-f]{32}", etag):
        return  # multipart uploads: the ETag is not an MD5 of the content
    digest = hashlib.md5(usedforsecurity=False)
    with dest.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() == etag:
        return
    with storage.s3_errors(uri, "check the encryption of", ModelError):
        head = client.head_object(Bucket=bucket, Key=key)
    if head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm"):
        return  # SSE-KMS / SSE-C ETags are not MD5s of the content
    raise ModelError(
        f"{uri}: downloaded content has MD5 {digest.hexdigest()}, the object's ETag says "
        f"{etag}; the download is corrupt, retry"
    )


def _download_hub_model(repo_id: str, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, cache_dir=str(cache)))
    except Exception as err:  # the hub client raises many types; all mean "not reachable"
        raise InputError(
            f"{repo_id}: not a local directory or s3:// prefix, and the model hub could not "
            f"provide it ({type(err).__name__}). Pass a local path or s3:// URI."
        ) from err


def _matches(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for pattern in patterns for p in path.glob(pattern))


def check_checkpoint(path: Path, *, allow_pickle: bool, trust_remote_code: bool) -> bool:
    """Refuse unsafe or incomplete checkpoints; return True when ``path`` is an adapter."""
    is_adapter = (path / "adapter_config.json").exists()
    if not is_adapter and not (path / "config.json").exists():
        raise ModelError(f"{path}: neither config.json nor adapter_config.json; not a checkpoint")
    if not _weights(path, SAFE_WEIGHTS):
        if not _weights(path, PICKLE_WEIGHTS):
            raise ModelError(
                f"{path}: no weights found (expected *.safetensors); is the checkpoint complete?"
            )
        if not allow_pickle:
            raise ModelError(
                f"{path}: only pickle-based weights (.bin/.pt), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source"
            )
    config_file = path / ("adapter_config.json" if is_adapter else "config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{config_file}: unreadable JSON ({err})") from err
    if config.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{config_file}: declares custom code (auto_map); pass --trust-remote-code only if "
            "you trust this checkpoint"
        )
    weight_shapes(path)  # refuses truncated or corrupt safetensors before anything loads
    return is_adapter


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in the checkpoint's safetensors files (headers only)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    for file in _weights(path, SAFE_WEIGHTS):
        if not file.exists():
            shapes.update(_header_shapes(file))
            continue
        try:
            with safe_open(str(file), framework="numpy") as handle:
                names = handle.keys()  # noqa: SIM118 - a safetensors handle is not a dict
                shapes.update({k: handle.get_slice(k).get_shape() for k in names})
        except (SafetensorError, OSError) as err:
            raise ModelError(
                f"{file}: corrupt or truncated safetensors file ({err}); download or save the "
                "checkpoint again"
            ) from err
    return shapes


def _weights(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The weight files of a checkpoint directory: those present, and in a planning directory
    (``resolve_model_dir(weights=False)``) those its S3 listing names (a safetensors file's
    header stands in for it)."""
    present = _matches(path, patterns)
    if not (path / HEADER_LISTING).exists():
        return present
    names = [rel for rel, *_ in json.loads((path / HEADER_LISTING).read_text())]
    listed = [
        path / n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns)
    ]
    return sorted(set(present) | set(listed))


def _header_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header saved beside where the file would be; refuses a
    header that is not JSON or whose tensors extend past the file's listed size."""
    saved = json.loads(file.with_name(file.name + HEADER).read_text())
    try:
        header = json.loads(saved["header"])
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ModelError(
            f"{file}: corrupt safetensors header ({err}); upload the checkpoint again"
        ) from err
    if 8 + saved["length"] + end != saved["size"]:
        raise ModelError(
            f"{file}: corrupt or truncated safetensors file (its header describes "
            f"{8 + saved['length'] + end} bytes, the object has {saved['size']}); upload the "
            "checkpoint again"
        )
    return shapes


def check_adapter_fits(adapter_dir: Path, reference_dir: Path) -> None:
    """Refuse a LoRA adapter that does not match the reference exactly, before loading (peft
    would only warn and drop what does not fit): every adapter tensor must belong to a module
    of the reference, its LoRA matrices must fit that module's weight, and any other tensor
    (``modules_to_save``) must have the reference tensor's shape."""
    adapter = weight_shapes(adapter_dir)
    base = weight_shapes(reference_dir)
    config = json.loads((reference_dir / "config.json").read_text())
    tied = config.get("tie_word_embeddings", True)  # an output head tied to the embeddings
    for key, shape in sorted(adapter.items()):
        name = key.removeprefix("base_model.model.")
        module, lora, part = name.partition(".lora_")
        if not lora:
            problem = _tensor_mismatch(name, shape, base, tied)
        else:
            problem = _lora_mismatch(module, part, key, adapter, base)
        if problem:
            raise ModelError(
                f"{adapter_dir}: the adapter does not fit reference {reference_dir}: {problem}; "
                "pass the base model it was trained on as --reference"
            )


def _in_reference(name: str, base: dict[str, list[int]]) -> list[int] | None:
    """The shape of ``name`` in the reference, with or without its first path segment."""
    return next((base[c] for c in (name, name.partition(".")[2]) if c in base), None)


def _tensor_mismatch(
    name: str, shape: list[int], base: dict[str, list[int]], tied: bool
) -> str | None:
    found = _in_reference(name, base)
    if found is None and tied and name.endswith("lm_head.weight"):
        return None  # the reference stores its tied output head as the input embedding
    if found is None:
        return f"tensor {name} does not exist in the reference"
    return None if found == shape else f"tensor {name} is {shape} but {found} in the reference"


def _lora_mismatch(
    module: str, part: str, key: str, adapter: dict[str, list[int]], base: dict[str, list[int]]
) -> str | None:
    """Why the LoRA tensor ``key`` (``<module>.lora_<part>``) does not fit, or None."""
    weight = _in_reference(f"{module}.weight", base)
    if weight is None or len(weight) < 2:
        return f"module {module} has no weight matrix in the reference (adapter tensor {key})"
    pairs = {"A.weight": "B.weight", "embedding_A": "embedding_B"}
    pair = pairs.get(part) or next((a for a, b in pairs.items() if b == part), None)
    if pair is None:
        return None  # magnitude vectors, LoRA biases: their module exists
    other = key.replace(f".lora_{part}", f".lora_{pair}")
    if other not in adapter:
        return f"module {module} has lora_{part} but no lora_{pair}"
    if part not in pairs:
        return None  # the pair is checked from its A side
    a_shape, b_shape = adapter[key], adapter[other]
    if part == "embedding_A":  # A: rank x vocabulary, B: width x rank
        fits = [a_shape[-1], b_shape[0]] == weight[:2]
    else:  # Linear (out x in) or GPT-2's Conv1D (in x out)
        fits = sorted((a_shape[1], b_shape[0])) == sorted(weight[:2])
    if fits and a_shape[0] == b_shape[1]:
        return None
    return (
        f"module {module} is {a_shape[1]}x{b_shape[0]} in the adapter but "
        f"{weight[0]}x{weight[1]} in the reference"
    )


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as recorded in its config."""
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if not base:
        raise ModelError(
            f"{adapter_dir}/adapter_config.json: no base_model_name_or_path; pass --reference"
        )
    return str(base)


def has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


def fingerprint(path: Path, cache_dir: str | Path | None = None) -> str:
    """The identity of a checkpoint's config and weight files, from what is already known:
    an S3 download's listing (keys, ETags, sizes), else each file's SHA-256, computed once per
    path, size and modification time and cached."""
    listing = path / COMPLETE
    if listing.exists():  # an S3 download records its listing
        return hashlib.sha256(listing.read_bytes()).hexdigest()[:32]
    digest = hashlib.sha256()
    for file in _matches(path, ("*.json", *SAFE_WEIGHTS, *PICKLE_WEIGHTS)):
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
        staging = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}")
        staging.write_text(digest.hexdigest())
        staging.replace(entry)
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
    target_dir = resolve_model_dir(target, cache_dir, weights)
    is_adapter = check_checkpoint(
        target_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
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
    if check_checkpoint(
        reference_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    ):
        raise InputError(f"{reference}: the reference must be a full checkpoint, not an adapter")
    tokenizer_dir = target_dir if has_tokenizer(target_dir) else reference_dir
    if not has_tokenizer(tokenizer_dir):
        raise ModelError(f"{target}: no tokenizer files in the target or the reference")
    if is_adapter:
        check_adapter_fits(target_dir, reference_dir)
    else:
        _check_same_vocab(target_dir, reference_dir)
    if has_tokenizer(reference_dir) and tokenizer_dir != reference_dir:
        _check_same_tokenizer(tokenizer_dir, reference_dir)
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


def _check_same_vocab(target_dir: Path, reference_dir: Path) -> None:
    sizes = [
        json.loads((d / "config.json").read_text()).get("vocab_size")
        for d in (target_dir, reference_dir)
    ]
    if sizes[0] != sizes[1]:
        raise ModelError(
            f"target {target_dir} has vocab_size {sizes[0]} but reference {reference_dir} has "
            f"{sizes[1]}: EZ-MIA compares the same tokens under both models, so they must "
            "share a tokenizer"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Both absent, or both files with the same bytes."""
    if a.is_file() and b.is_file():
        return filecmp.cmp(a, b, shallow=False)
    return not a.exists() and not b.exists()


def _check_same_tokenizer(target_dir: Path, reference_dir: Path) -> None:
    """Refuse two tokenizers with different vocabularies; byte-identical tokenizer files are
    the same tokenizer, without loading either."""
    names = TOKENIZER_FILES + TOKENIZER_EXTRA_FILES
    if all(_same_file(target_dir / name, reference_dir / name) for name in names):
        return
    if load_tokenizer(target_dir).get_vocab() != load_tokenizer(reference_dir).get_vocab():
        raise ModelError(
            f"the tokenizers of target {target_dir} and reference {reference_dir} differ: "
            "EZ-MIA needs both models to score the same token ids"
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

    use_safetensors = True if _matches(path, SAFE_WEIGHTS) or not allow_pickle else None
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
        reason = " ".join(str(err).split())[:300]
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
    staging = out.with_name(f".{key}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    for name in TOKENIZER_FILES + TOKENIZER_EXTRA_FILES:
        if (plan.tokenizer / name).exists():
            shutil.copy(plan.tokenizer / name, staging / name)
    (staging / COMPLETE).write_text(key)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


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
