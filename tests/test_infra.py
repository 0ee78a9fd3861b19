"""Proves tests/infra.py: moto S3 via boto3 and pyarrow, a 2-node loopback Ray cluster that
takes jobs, and that nothing we start listens off loopback."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

try:
    from tests import infra
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    import infra

LocalRayCluster = infra.LocalRayCluster
MotoServer = infra.MotoServer
free_port = infra.free_port
is_loopback = infra.is_loopback
listener_snapshot = infra.listener_snapshot
listeners_off_loopback = infra.listeners_off_loopback
process_tree = infra.process_tree
sockets_off_loopback = infra.sockets_off_loopback
_pids_of = infra._pids_of


@pytest.fixture(scope="module")
def baseline():
    return listener_snapshot()


@pytest.fixture(scope="module")
def moto_s3(baseline):
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def ray_cluster(baseline):
    with LocalRayCluster(head_cpus=2, worker_cpus=2, object_store_mb=200) as rc:
        yield rc


def test_is_loopback():
    assert is_loopback("127.0.0.1:80")
    assert is_loopback("127.0.0.53%lo:53")
    assert is_loopback("[::1]:80")
    assert is_loopback("[::ffff:127.0.0.1]:80")
    assert not is_loopback("0.0.0.0:80")
    assert not is_loopback("*:80")
    assert not is_loopback("[::]:80")
    assert not is_loopback("192.0.2.2:80")
    assert not is_loopback("[::ffff:192.0.2.2]:80")


def test_free_port():
    assert 1024 <= free_port() <= 65535


def test_moto_boto3_and_pyarrow(moto_s3, monkeypatch):
    bucket = moto_s3.make_bucket("ezmia-infra")
    client = moto_s3.client()
    client.put_object(Bucket=bucket, Key="a/hello.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/hello.txt")["Body"].read() == b"hello"

    # Environment-only configuration, as jobs see it.
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    env_client = boto3.client("s3")
    assert env_client.get_object(Bucket=bucket, Key="a/hello.txt")["Body"].read() == b"hello"

    pafs, path = fs.FileSystem.from_uri(f"s3://{bucket}/a/hello.txt")
    with pafs.open_input_stream(path) as f:
        assert f.read() == b"hello"

    table = pa.table({"x": [1, 2, 3]})
    pq.write_table(table, f"{bucket}/t/part-0.parquet", filesystem=pafs)
    assert pq.read_table(f"s3://{bucket}/t/").equals(table)

    # Explicit S3FileSystem with endpoint_override.
    explicit = moto_s3.filesystem()
    with explicit.open_input_stream(f"{bucket}/a/hello.txt") as f:
        assert f.read() == b"hello"


def test_moto_restart_same_port(moto_s3):
    bucket = moto_s3.make_bucket("ezmia-restart")
    client = moto_s3.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"v")
    port = moto_s3.port
    moto_s3.stop()
    assert not moto_s3.running()
    with pytest.raises(Exception):  # noqa: B017 - any connection error
        moto_s3.client(retries={"max_attempts": 1}).list_buckets()
    moto_s3.start()
    assert moto_s3.port == port
    # In-memory: the object is gone, the bucket was re-created empty.
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert bucket in names
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.ray
def test_ray_job_two_nodes(ray_cluster, moto_s3, tmp_path):
    assert ray_cluster.address.startswith("127.0.0.1:")
    assert ray_cluster.dashboard_url.startswith("http://127.0.0.1:")
    assert ray_cluster.node_count() == 2

    bucket = moto_s3.make_bucket("ezmia-rayjob")
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            import ray
            import boto3

            ray.init()
            print("PYTHON", sys.executable)
            print("NODES", len([n for n in ray.nodes() if n["Alive"]]))
            print("RESOURCES", ray.cluster_resources())

            @ray.remote(num_cpus=0.5)
            def put(i):
                boto3.client("s3").put_object(Bucket="{bucket}", Key=f"k{{i}}", Body=b"x")
                return ray.get_runtime_context().get_node_id()

            print("TASK_NODES", len(set(ray.get([put.remote(i) for i in range(8)]))))
            """
        )
    )
    job_id = ray_cluster.submit_job("python job.py", working_dir=tmp_path, env_vars=moto_s3.env)
    # While the job runs, no socket of ours (listening or connected) leaves loopback.
    off = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        off += sockets_off_loopback(process_tree())
        if ray_cluster.client.get_job_status(job_id).is_terminal():
            break
        time.sleep(0.5)
    status, logs = ray_cluster.wait_job(job_id, timeout=5)
    assert off == []
    assert status == "SUCCEEDED", logs
    assert "NODES 2" in logs, logs
    assert f"PYTHON {infra.VENV_BIN}{os.sep}python" in logs, logs  # the venv's interpreter
    assert moto_s3.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 8

    # The trivial job from the brief, with the venv interpreter by absolute path.
    status, logs = ray_cluster.submit(
        f'{sys.executable} -c "import ray; ray.init(); print(ray.cluster_resources())"',
        timeout=120,
    )
    assert status == "SUCCEEDED", logs
    assert "'CPU': 4.0" in logs, logs


@pytest.mark.ray
def test_no_listener_off_loopback(ray_cluster, moto_s3, baseline):
    """While moto and both Ray nodes run, nothing of ours listens off loopback."""
    ours = process_tree()
    assert moto_s3.pid in ours
    # The pid filter is not vacuous: it sees moto, the GCS and both raylets.
    our_listeners = [line for line in listener_snapshot() if _pids_of(line) & ours]
    text = "\n".join(our_listeners)
    assert "gcs_server" in text and text.count("raylet") >= 2, text
    assert f"pid={moto_s3.pid}," in text, text
    assert listeners_off_loopback(baseline, pids=ours) == []


@pytest.mark.ray
def test_remove_worker(ray_cluster):
    """Fault injection: killing the worker node drops it from the cluster; re-adding works.

    Runs last in this module (file order) because it changes the cluster.
    """
    ray_cluster.remove_worker()
    deadline = time.monotonic() + 60
    while ray_cluster.node_count() != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_cluster.node_count() == 1
    ray_cluster.add_worker()
    assert ray_cluster.node_count() == 2
