"""Session fixtures: tiny real models built once, a real S3 endpoint (moto server process on
127.0.0.1) and helpers shared by the tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import tests.infra  # noqa: F401  (sets the loopback-only Ray environment before any ray import)

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "test-models"


@pytest.fixture(scope="session")
def models():
    """Tokenizer, base, full fine-tune and LoRA adapter trained on stdlib docstrings, plus
    member / non-member / labelled eval Parquet files (built once, cached across runs)."""
    from ezmia.demo.build import TEST_COUNTS, build_demo_artifacts
    from ezmia.demo.train import TEST_SIZES

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
