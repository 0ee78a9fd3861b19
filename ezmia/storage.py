"""Local paths and ``s3://`` URIs behind one small set of file operations.

S3 goes through boto3 and pyarrow, which both honour the standard AWS chain
(``AWS_ENDPOINT_URL``, credentials, region).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ezmia.errors import InputError


@dataclass(frozen=True)
class Encryption:
    """S3 server-side encryption for everything written (``aws:kms`` or ``AES256``)."""

    algorithm: str | None = None
    kms_key_id: str | None = None

    def put_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        if self.algorithm:
            args["ServerSideEncryption"] = self.algorithm
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise InputError(f"{uri}: not a valid s3:// URI (expected s3://bucket/prefix)")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


@functools.lru_cache(maxsize=1)
def s3_client():
    """A boto3 S3 client from the standard AWS chain (``AWS_ENDPOINT_URL`` honoured)."""
    import boto3
    from botocore.config import Config

    retries = {
        "max_attempts": int(os.environ.get("EZMIA_S3_MAX_ATTEMPTS", "3")),
        "mode": "standard",
    }
    return boto3.client("s3", config=Config(retries=retries))


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it."""
    if is_s3(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except s3_client().exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str, data: bytes, encryption: Encryption | None = None) -> None:
    """Write one object; local writes go through a temp file and an atomic rename."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = encryption.put_args() if encryption else {}
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def list_files(prefix: str) -> list[str]:
    """Every file under a directory or S3 prefix, sorted, as full URIs."""
    if not is_s3(prefix):
        root = Path(prefix)
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    bucket, key = split_s3(prefix)
    key = key if not key or key.endswith("/") else key + "/"
    found: list[str] = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        found.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    return sorted(found)


def delete_prefix(prefix: str) -> None:
    """Remove everything under a directory or S3 prefix."""
    if not is_s3(prefix):
        import shutil

        shutil.rmtree(prefix, ignore_errors=True)
        return
    bucket = split_s3(prefix)[0]
    keys = [split_s3(uri)[1] for uri in list_files(prefix)]
    for start in range(0, len(keys), 1000):
        objects = [{"Key": k} for k in keys[start : start + 1000]]
        s3_client().delete_objects(Bucket=bucket, Delete={"Objects": objects})
