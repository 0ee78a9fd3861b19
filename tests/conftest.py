"""Session fixtures: tiny real models built once, a real S3 endpoint (moto server process on
127.0.0.1) and helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE, Popen

import pytest

import tests.infra  # noqa: F401  (sets the loopback-only Ray environment before any ray import)

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "test-models"


@pytest.fixture(scope="session")
def models():
    """Tokenizer, base, full fine-tune and LoRA adapter trained on stdlib docstrings, plus
    member / non-member / labelled eval Parquet files (built once, cached across runs)."""
    from ezmia.demo.build import build_demo_artifacts
    from tests.sizes import TEST_COUNTS, TEST_SIZES

    return build_demo_artifacts(MODEL_CACHE, TEST_SIZES, **TEST_COUNTS, seed=0, log=lambda *_: None)


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on loopback; the AWS_* variables point boto3 and pyarrow at it."""
    from tests.infra import MotoServer

    saved = dict(os.environ)
    with MotoServer() as server:
        os.environ.update(server.env)
        from ezmia.data import storage

        storage.s3_client.cache_clear()
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)
            storage.s3_client.cache_clear()


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test."""
    name = "t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-")
    s3.make_bucket(name)
    return name


def upload_dir(client, local: Path, bucket: str, prefix: str) -> str:
    """Upload a local directory under ``s3://bucket/prefix/``; returns the URI."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"


def dead_pid() -> int:
    """The pid of a process that has exited (a lock owner that died)."""
    proc = Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def audit_args(
    models,
    out,
    *extra: str,
    data=None,
    target=None,
    max_length: int = 64,
    bootstrap_rounds: int = 0,
) -> list[str]:
    """``ezmia audit`` arguments for a labelled audit of the test models' eval set."""
    return [
        "audit", "--target", str(target or models.full), "--reference", str(models.base),
        "--data", str(data or models.eval), "--id-column", "id", "--label-column", "is_member",
        "--out", str(out), "--max-length", str(max_length),
        "--bootstrap-rounds", str(bootstrap_rounds), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def audit_process(models, out: Path, *extra: str, copies: int) -> Iterator[tuple[Popen, list]]:
    """``python -m ezmia audit`` of ``copies`` copies of the eval texts (unlabelled) into
    ``out``, in a process of its own: yields it and its arguments once it holds the output's
    lock; killed on leaving if it still runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ezmia.data import outputs

    data = out.parent / "many.parquet"
    texts = pq.read_table(models.eval, columns=["text"]).column("text").to_pylist() * copies
    pq.write_table(pa.table({"text": texts}), data)
    args = ["audit", "--target", str(models.full), "--reference", str(models.base),
            "--data", str(data), "--out", str(out), "--max-length", "64", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = Popen([sys.executable, "-m", "ezmia", *args], env=env, stderr=PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / outputs.LOCK).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the audit never started writing"
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        yield proc, args
    finally:
        proc.kill()


def stop_with_sigterm(proc: Popen, out: Path) -> list[str]:
    """SIGTERM ``proc`` (an ``audit_process``), check it ended as on Ctrl-C (exit 130, its
    output removed) and return its stderr lines."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not out.exists()
    return err.splitlines()
