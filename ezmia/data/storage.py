"""Local paths and ``s3://`` URIs behind one small set of file operations.

S3 goes through boto3 and pyarrow, which both honour the standard AWS chain
(``AWS_ENDPOINT_URL``, credentials, region); pyarrow's timeouts and tries are boto3's.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ezmia.errors import EzmiaError, InputError, OutputError

CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or grant this role access "
    "to the bucket"
)
_CREDENTIAL_CODES = ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "ExpiredToken", "InvalidToken", "Forbidden", "403")  # fmt: skip
_CONNECTION_CODES = ("EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError",
                     "ReadTimeoutError", "NETWORK_CONNECTION", "Could not connect")  # fmt: skip


@dataclass(frozen=True)
class Encryption:
    """S3 server-side encryption for everything written (``aws:kms`` or ``AES256``)."""

    algorithm: str | None = None
    kms_key_id: str | None = None

    def put_args(self) -> dict[str, str]:
        args = {"ServerSideEncryption": self.algorithm, "SSEKMSKeyId": self.kms_key_id}
        return {name: value for name, value in args.items() if value}


def _endpoint() -> str:
    """The S3 endpoint in use and the variable that sets it, without any query string or user
    info."""
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if url := os.environ.get(variable):
            return f"{re.sub(r'//[^/@]*@', '//', url.split('?')[0])}: check {variable}"
    return "the default AWS endpoint: check AWS_ENDPOINT_URL"


def describe_s3_error(err: BaseException) -> str | None:
    """One plain line for an S3 failure from boto3 or pyarrow (no URLs, no secrets), with
    what to do about it; ``None`` when ``err`` is not an S3 failure."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    text = str(err)
    if isinstance(err, ClientError):
        code = s3_code(err)
    elif isinstance(err, (BotoCoreError, Boto3Error)):
        code = type(err).__name__
    elif isinstance(err, OSError) and "AWS Error" in text:
        code = text.split("AWS Error ", 1)[1].split(" ", 1)[0]
    else:
        return None
    if code in ("NoSuchBucket", "NO_SUCH_BUCKET"):
        return "the bucket does not exist (check the bucket name, and the endpoint and region)"
    if code in ("NoSuchKey", "404", "NotFound", "RESOURCE_NOT_FOUND", "NO_SUCH_KEY"):
        return "no such object"
    if code in ("NoCredentialsError", "PartialCredentialsError"):
        return f"no AWS credentials found: {CREDENTIALS_HINT}"
    if _matches(code, text, _CREDENTIAL_CODES):
        return f"access denied ({code}): {CREDENTIALS_HINT}"
    if _matches(code, text, _CONNECTION_CODES):
        return f"could not connect to the S3 endpoint {_endpoint()} and the network"
    line = re.sub(r"https?://\S+", "<url>", text.splitlines()[0] if text else code)
    return f"S3 error {code}: {line[:200]}"


def _matches(code: str, text: str, known: tuple[str, ...]) -> bool:
    return code in known or any(k in text for k in known if len(k) > 3)


def s3_code(err: Exception) -> str:
    """The error code of a boto3 ``ClientError`` (empty for any other error)."""
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def s3_errors(uri: str, action: str, error: type[EzmiaError] = InputError) -> Iterator[None]:
    """Turn boto3/pyarrow S3 failures inside the block into ``error`` naming ``uri``."""
    try:
        yield
    except EzmiaError:
        raise
    except Exception as err:
        reason = describe_s3_error(err)
        if reason is None:
            raise
        raise error(f"{uri}: cannot {action}: {reason}") from err


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


S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 20.0
S3_MAX_ATTEMPTS = 3


@functools.lru_cache(maxsize=1)
def s3_client():
    """A boto3 S3 client from the standard AWS chain (``AWS_ENDPOINT_URL`` honoured).

    Connect and read timeouts are bounded (``EZMIA_S3_CONNECT_TIMEOUT``,
    ``EZMIA_S3_READ_TIMEOUT``, seconds), so an endpoint that never answers fails within about
    ``attempts x (connect + read)``. Retries follow the AWS chain (``AWS_MAX_ATTEMPTS``,
    ``AWS_RETRY_MODE``, the profile); ezmia's own ``EZMIA_S3_MAX_ATTEMPTS`` wins when set,
    and without either, 3 attempts in ``standard`` mode."""
    import boto3
    from botocore.config import Config

    env = os.environ
    options: dict = {
        "connect_timeout": float(env.get("EZMIA_S3_CONNECT_TIMEOUT", S3_CONNECT_TIMEOUT_S)),
        "read_timeout": float(env.get("EZMIA_S3_READ_TIMEOUT", S3_READ_TIMEOUT_S)),
    }
    # A fresh session, so credentials are resolved again after ``s3_client.cache_clear()``.
    session = boto3.session.Session()
    chain = session._session  # botocore's view of the environment and the profile
    if "EZMIA_S3_MAX_ATTEMPTS" in env:
        options["retries"] = {"total_max_attempts": int(env["EZMIA_S3_MAX_ATTEMPTS"])}
    elif chain.get_config_variable("max_attempts") is None:
        options["retries"] = {"total_max_attempts": S3_MAX_ATTEMPTS}
    # botocore fills in its own default mode (``legacy`` before 2025): ask what the user set
    if not (env.get("AWS_RETRY_MODE") or chain.get_scoped_config().get("retry_mode")):
        options.setdefault("retries", {})["mode"] = "standard"
    return session.client("s3", config=Config(**options))


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it. On S3, pyarrow resolves the endpoint and
    region itself and takes its timeouts and number of tries from ``s3_client()``'s."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    resolved, path = pafs.FileSystem.from_uri(uri)
    options = resolved.__reduce__()[1][0]  # what from_uri resolved, as S3FileSystem's options
    config = s3_client().meta.config
    options |= {
        "connect_timeout": config.connect_timeout,
        "request_timeout": config.read_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(config.retries["total_max_attempts"]),
    }
    return pafs.S3FileSystem(**options), path


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    with s3_errors(uri, "check whether it exists"):
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except s3_client().exceptions.ClientError as err:
            if s3_code(err) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return True


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    with s3_errors(uri, "read"):
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except s3_client().exceptions.NoSuchKey as err:
            raise FileNotFoundError(uri) from err


def write_bytes(uri: str, data: bytes, encryption: Encryption | None = None) -> None:
    """Write one object; local writes go through a temp file and an atomic rename."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = encryption.put_args() if encryption else {}
        with s3_errors(uri, "write", OutputError):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return
    path = Path(uri)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a failed write or rename leaves nothing behind
        raise OutputError(f"{uri}: cannot write ({err.strerror or err})") from err


def write_parquet(uri: str, table: pa.Table, encryption: Encryption | None = None) -> None:
    """Write ``table`` as one Parquet file or object (see ``write_bytes``)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), encryption)


def list_files(prefix: str) -> list[str]:
    """Every file under a directory or S3 prefix, sorted, as full URIs."""
    if not is_s3(prefix):
        root = Path(prefix)
        if root.is_file():
            return [str(root)]
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    bucket, key = split_s3(prefix)
    folder = key if not key or key.endswith("/") else key + "/"
    with s3_errors(prefix, "list"):
        found = [
            f"s3://{bucket}/{obj['Key']}"
            for obj in s3_objects(bucket, key)
            if obj["Key"] == key or obj["Key"].startswith(folder)
        ]
    return sorted(found)


def s3_objects(bucket: str, prefix: str) -> Iterator[dict]:
    """Every object (a ``list_objects_v2`` entry) under ``prefix`` in ``bucket``, all pages."""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        yield from page.get("Contents", [])


def delete(uri: str) -> None:
    """Remove one file or object if it exists."""
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    with s3_errors(uri, "delete", OutputError):
        s3_client().delete_object(Bucket=bucket, Key=key)
