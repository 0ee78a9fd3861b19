"""Private by default: no raw text in any output unless ``--include-text``; S3 server-side
encryption on every object written; credentials and signed URLs never in outputs or logs."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq

from ezmia.cli import main
from ezmia.data import storage
from tests.conftest import audit_args, upload_dir

SMALL = {"max_length": 32, "bootstrap_rounds": 5}

CANARY = "The violet heron of Zanzibar counted 7341 lanterns before the eclipse."
SECRET = "EzmiaCanarySecret/9f8e7d6c5b4a39281706+QzX"
ACCESS_KEY = "AKIAEZMIACANARY00042"
KMS_KEY = "arn:aws:kms:us-east-1:111122223333:key/ezmia-test-key"


def _dataset(models, path) -> str:
    """Four members (one of them the canary sentence) and four non-members."""
    table = pq.read_table(models.eval)
    members = table.filter(table.column("is_member")).slice(0, 3)
    nonmembers = table.filter(pa.compute.invert(table.column("is_member"))).slice(0, 4)
    canary = pa.table(
        {"id": ["canary"], "text": [CANARY], "is_member": [True]}, schema=table.schema
    )
    pq.write_table(pa.concat_tables([members, canary, nonmembers]), path)
    return str(path)


def _texts_in(data: bytes) -> str:
    """Everything readable in one output file: its raw bytes and, for Parquet (which may
    compress), every cell of every column decoded."""
    parts = [data.decode("utf-8", errors="replace")]
    if data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        parts += [str(v) for column in table.columns for v in column.to_pylist()]
        parts.append(str(table.schema.metadata))
    return "\n".join(parts)


def _objects(client, bucket: str, prefix: str) -> dict[str, dict]:
    """Every object under ``prefix``: its ``head_object`` answer plus its ``Body`` bytes."""
    found = {}
    for entry in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        head = client.head_object(Bucket=bucket, Key=entry["Key"])
        head["Body"] = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
        found[entry["Key"]] = head
    return found


def test_outputs_hold_no_raw_text_and_every_object_is_encrypted(models, s3, tmp_path):
    bucket = s3.make_bucket("privacy-default")
    client = s3.client()
    client.upload_file(_dataset(models, tmp_path / "d.parquet"), bucket, "data/d.parquet")
    out = f"s3://{bucket}/audit"
    assert (
        main(audit_args(models, out, "--sse", "AES256", data=f"s3://{bucket}/data/", **SMALL)) == 0
    )
    objects = _objects(client, bucket, "audit/")
    assert {"audit/_SUCCESS", "audit/summary.json", "audit/report.html"} <= set(objects)
    assert any(key.startswith("audit/scores/") for key in objects)
    for key, head in objects.items():
        assert head.get("ServerSideEncryption") == "AES256", key
        text = _texts_in(head["Body"])
        assert CANARY not in text and "violet heron" not in text, key
    scores = pq.read_table(
        io.BytesIO(next(h["Body"] for k, h in objects.items() if "scores/" in k))
    )
    assert "text" not in scores.column_names
    by_id = {row["id"]: row["text_sha256"] for row in scores.to_pylist()}
    assert by_id["canary"] == hashlib.sha256(CANARY.encode()).hexdigest()  # join back by hash


def test_include_text_is_the_only_way_texts_reach_the_outputs(models, tmp_path):
    data = _dataset(models, tmp_path / "d.parquet")
    out = tmp_path / "with-text"
    assert main(audit_args(models, out, "--include-text", data=data, **SMALL)) == 0
    found = [p.name for p in out.rglob("*") if p.is_file() and CANARY in _texts_in(p.read_bytes())]
    assert found and all(name.endswith(".parquet") for name in found)


def test_credentials_never_reach_outputs_or_logs(models, s3, tmp_path, monkeypatch, capfd):
    """An S3 audit (model, data and output on S3, verbose logging, SSE-KMS) under
    distinctive credentials: neither they nor a request signature appear anywhere."""
    bucket = s3.make_bucket("privacy-secrets")
    client = s3.client()
    client.upload_file(_dataset(models, tmp_path / "d.parquet"), bucket, "data/d.parquet")
    target = upload_dir(client, models.lora, bucket, "models/lora")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    storage.s3_client.cache_clear()
    out = f"s3://{bucket}/audit"
    args = audit_args(
        models,
        out,
        "--sse",
        "aws:kms",
        "--sse-kms-key-id",
        KMS_KEY,
        "--cache-dir",
        str(tmp_path / "cache"),
        data=f"s3://{bucket}/data/",
        target=target,
        **SMALL,
    )
    try:
        assert main(["--verbose", *args]) == 0
    finally:
        storage.s3_client.cache_clear()
    captured = capfd.readouterr()
    objects = _objects(client, bucket, "audit/")
    for key, head in objects.items():
        assert head.get("ServerSideEncryption") == "aws:kms", key
        assert head.get("SSEKMSKeyId") == KMS_KEY, key
    haystacks = {key: _texts_in(head["Body"]) for key, head in objects.items()}
    haystacks |= {"stdout": captured.out, "stderr": captured.err}
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    haystacks |= {str(p): p.read_bytes().decode("latin-1") for p in cached}
    for where, text in haystacks.items():
        for needle in (SECRET, ACCESS_KEY, "X-Amz-Signature", "X-Amz-Credential"):
            assert needle not in text, f"{needle!r} found in {where}"
