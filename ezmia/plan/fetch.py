"""Model files on this machine: a local directory as it is, an ``s3://`` prefix downloaded
once per machine into the model cache (keyed by the objects' ETags, verified against their
sizes and MD5s), a planning copy holding only the small files and each safetensors file's
header, or a hub snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ezmia.data import storage
from ezmia.errors import InputError, ModelError

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
COMPLETE = ".ezmia-complete"  # written last into a finished cache entry (download or merge)
PROGRESS_BYTES = 100_000_000  # downloads log each file at least this big, and the last one
log = logging.getLogger(__name__)

HEADER = ".ezmia-header"
"""Suffix of a safetensors file's header (its JSON), fetched in place of the file for planning."""
HEADER_LISTING = ".ezmia-weights"  # a planning directory's list of the weights it lacks
MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The model cache: ``cache_dir`` when given (``--cache-dir``), else ``$EZMIA_CACHE``,
    else ``~/.cache/ezmia``."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("EZMIA_CACHE", Path.home() / ".cache" / "ezmia"))


def resolve_model_dir(uri: str, cache_dir: str | Path | None = None, weights: bool = True) -> Path:
    """A local directory holding the model at ``uri`` (downloading S3 or hub models once).
    Without ``weights``, an S3 model's directory holds its small files and each safetensors
    file's header only (``HEADER``; range requests): enough to plan and check, never to load."""
    cache = cache_root(cache_dir)
    if storage.is_s3(uri):
        folder = cache / ("models" if weights else "plans")
        return _download_s3_model(uri, folder, weights=weights, headers=not weights)
    path = Path(uri).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or uri.startswith((".", "/", "~")):
        raise InputError(f"{uri}: model path is not a directory (expected a checkpoint folder)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(uri, cache_dir=str(cache / "hub")))
    except Exception as err:  # the hub client raises many types; all mean "not reachable"
        raise InputError(
            f"{uri}: not a local directory or s3:// prefix, and the model hub could not "
            f"provide it ({type(err).__name__}). Pass a local path or s3:// URI."
        ) from err


def is_weight_file(name: str) -> bool:
    """Whether a checkpoint file holds weights (the large files), by its name."""
    return any(fnmatch.fnmatch(name, p) for p in (*SAFE_WEIGHTS, *PICKLE_WEIGHTS))


def resolve_tokenizer_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the tokenizer of the model at ``uri``: for an S3 model only
    its small files (configs, tokenizer), downloaded once per machine; never its weights."""
    if storage.is_s3(uri):
        cache = cache_root(cache_dir) / "tokenizers"
        return _download_s3_model(uri, cache, weights=False)
    return resolve_model_dir(uri, cache_dir)


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a file beside a cache entry): processes of one machine
    that want the same entry wait for the first to fetch it, then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # never through a link: opening one would create or touch the file it points at
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise ModelError(
            f"{path}: cannot open this model cache lock ({err.strerror}); if it is a symbolic "
            "link, remove it (ezmia creates its cache locks itself)"
        ) from err
    with os.fdopen(fd, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_s3_model(uri: str, cache: Path, weights: bool = True, headers: bool = False) -> Path:
    """Download every object under the prefix (without ``weights``, all but the weight files)
    once per machine, under a file lock that concurrent processes share; each file is checked
    against the listing's size and, for single-part uploads, its MD5 ETag. A cached copy is
    reused only while its files still have the listed sizes."""
    bucket, prefix = storage.split_s3(uri.rstrip("/") + "/")
    client = storage.s3_client()
    with storage.s3_errors(uri, "list the model prefix", ModelError):
        objects = list(storage.s3_objects(bucket, prefix))
    if not objects:
        raise ModelError(f"{uri}: no objects under this model prefix (check the model path)")
    listing = sorted((o["Key"][len(prefix) :], o["ETag"], o["Size"]) for o in objects)
    files = [(rel, etag, size) for rel, etag, size in listing if rel and not rel.endswith("/")]
    for rel, _etag, _size in files:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ModelError(
                f"{uri.rstrip('/')}/{rel}: this object's key leads out of the model folder "
                "('..' or '//'), so ezmia will not download it; rename or remove the object"
            )
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:24]
    if not weights:
        files = [f for f in files if not is_weight_file(f[0])]
    target = cache / key
    if _cached(target, files, headers):
        return target
    with _cache_lock(cache / f".{key}.lock"):
        if _cached(target, files, headers):
            return target  # another process fetched it while this one waited
        with staged_entry(target) as staging:
            _fetch(client, uri, bucket, prefix, files, staging)
            if headers:
                (staging / HEADER_LISTING).write_text(json.dumps([list(f) for f in listing]))
                for rel, _etag, size in listing:
                    if fnmatch.fnmatch(rel, "*.safetensors"):
                        _fetch_header(client, bucket, prefix + rel, staging / (rel + HEADER), size)
            (staging / COMPLETE).write_text(json.dumps(listing))
    return target


@contextlib.contextmanager
def staged_entry(target: Path) -> Iterator[Path]:
    """A new folder beside the cache entry ``target`` to build it in: renamed to ``target``
    when the block ends, removed when it raises. Always a new folder, never one already there
    (a link planted at a predictable name would be written through)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        staging.chmod(0o755)  # as an entry made by mkdir: readable by the cache's other users
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _fetch(
    client, uri: str, bucket: str, prefix: str, files: list[tuple[str, str, int]], staging: Path
) -> None:
    """Download and verify ``files`` into ``staging``, logging each file with this machine's
    name and the bytes done so far."""
    total, done = sum(size for _, _, size in files), 0
    host = socket.gethostname()
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
    markers = (COMPLETE, HEADER_LISTING) if headers else (COMPLETE,)
    if not all((directory / marker).exists() for marker in markers):
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


def matching_files(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The files of ``path`` that match any of ``patterns``, sorted."""
    return sorted(p for pattern in patterns for p in path.glob(pattern))
