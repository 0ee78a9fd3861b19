"""The demo's Ray job reads and writes S3 with the credentials of the cluster's nodes; none
enters its runtime environment, which ``ray job list`` shows to anyone on the cluster."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from ezmia.demo.run import submit
from tests.infra import LocalRayCluster

pytestmark = pytest.mark.ray

SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def test_demo_job_runs_on_the_nodes_credentials_and_its_runtime_env_holds_none(
    s3, bucket, models, tmp_path, monkeypatch
):
    client = s3.client()
    for name in ("members", "nonmembers"):
        rows = pq.read_table(getattr(models, name)).slice(0, 20)
        pq.write_table(rows, tmp_path / f"{name}.parquet")
        client.upload_file(str(tmp_path / f"{name}.parquet"), bucket, f"data/{name}.parquet")
    spec = {
        "out": f"s3://{bucket}/audits",
        "date": "2026-01-05",
        "defaults": {"reference": str(models.base), "max_length": 32, "bootstrap_rounds": 0,
                     "engine": "local", "cache_dir": str(tmp_path / "cache"),
                     "members": [f"s3://{bucket}/data/members.parquet"],
                     "nonmembers": [f"s3://{bucket}/data/nonmembers.parquet"]},
        "audits": [{"name": "lora", "target": str(models.lora)}],
    }  # fmt: skip
    client.put_object(Bucket=bucket, Key="job.yaml", Body=yaml.safe_dump(spec).encode())
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-of-the-submitter")
    with LocalRayCluster(head_cpus=1, worker_cpus=1) as cluster:  # nodes started with s3.env
        monkeypatch.setenv("RAY_ADDRESS", cluster.dashboard_url)
        monkeypatch.setenv("EZMIA_CACHE", str(tmp_path / "cache"))
        job = submit(f"s3://{bucket}/job.yaml", timeout_s=300)
        shown = [cluster.client.get_job_info(job).runtime_env] + [
            j.runtime_env for j in cluster.client.list_jobs()
        ]
    key = "audits/date=2026-01-05/checkpoint=lora/_SUCCESS"
    assert client.head_object(Bucket=bucket, Key=key)  # the job read and wrote S3
    text = json.dumps(shown)
    assert shown[0]["env_vars"]["AWS_ENDPOINT_URL"] == s3.endpoint
    assert not [k for env in shown for k in env.get("env_vars", {}) if k in SECRETS]
    assert s3.SECRET_KEY not in text and "session-token-of-the-submitter" not in text
