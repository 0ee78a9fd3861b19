"""The org-wide audit as a real ``ray job submit`` to a two-node loopback Ray cluster, with
data, models and reports in a real S3 endpoint (moto server process)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ezmia.audit import audit
from ezmia.config import AuditConfig
from tests.conftest import REPO, audit_process, stop_with_sigterm, upload_dir
from tests.infra import (
    LocalRayCluster,
    listener_snapshot,
    listeners_off_loopback,
    process_tree,
    sockets_off_loopback,
)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(s3):
    baseline = listener_snapshot()
    with LocalRayCluster(head_cpus=2, worker_cpus=2) as rc:
        rc.listener_baseline = baseline
        yield rc


@pytest.fixture(scope="module")
def staged(models, s3):
    """Models and data uploaded once to a bucket of their own."""
    bucket = s3.make_bucket("ray-job")
    client = s3.client()
    uris = {
        name: upload_dir(client, getattr(models, name), bucket, f"models/{name}")
        for name in ("base", "full", "lora")
    }
    client.upload_file(str(models.eval), bucket, "data/eval/part-0.parquet")
    uris["eval"] = f"s3://{bucket}/data/eval/"
    uris["bucket"] = bucket
    return uris


def put_yaml(s3, bucket: str, key: str, spec: dict) -> str:
    s3.client().put_object(Bucket=bucket, Key=key, Body=yaml.safe_dump(spec).encode())
    return f"s3://{bucket}/{key}"


def read_s3_table(s3, uri: str) -> pa.Table:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    client = s3.client()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        if o["Key"].endswith(".parquet")
    ]
    tables = [
        pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read()))
        for k in keys
    ]
    return pa.concat_tables(tables, promote_options="permissive")


def submit(cluster, s3, config_uri: str, tmp_path, timeout=420.0):
    env = {**s3.env, "EZMIA_CACHE": str(tmp_path / "cache")}
    return cluster.submit_job(f"python jobs/audit.py --config {config_uri}", REPO, env), env


def test_two_audit_job_matches_local_engine_and_indexes_both(cluster, s3, staged, models, tmp_path):
    defaults = {
        "reference": staged["base"],
        "data": [staged["eval"]],
        "id_column": "id",
        "label_column": "is_member",
        "max_length": 64,
        "bootstrap_rounds": 20,
        "engine": "ray",
        "ray": {"max_actors": 2, "rows_per_block": 32},
    }
    spec = {
        "out": f"s3://{staged['bucket']}/audits/",
        "date": "2026-01-02",
        "defaults": defaults,
        "audits": [
            {"name": "full", "target": staged["full"]},
            {"name": "lora", "target": staged["lora"]},
        ],
    }
    job, _ = submit(cluster, s3, put_yaml(s3, staged["bucket"], "jobs/two.yaml", spec), tmp_path)
    status, logs = cluster.wait_job(job, timeout=600)
    assert status == "SUCCEEDED", logs[-3000:]
    for name in ("full", "lora"):
        out = f"s3://{staged['bucket']}/audits/date=2026-01-02/checkpoint={name}"
        s3.client().head_object(Bucket=staged["bucket"], Key=out.split("/", 3)[3] + "/_SUCCESS")
        remote = read_s3_table(s3, f"{out}/scores/").sort_by("id")
        local = audit(
            AuditConfig(
                **{
                    **defaults,
                    "engine": "local",
                    "target": staged[name],
                    "out": str(tmp_path / name),
                    "cache_dir": str(tmp_path / "c"),
                }
            )
        )
        here = pq.read_table(os.path.join(local.out, "scores")).sort_by("id")
        assert remote.column("id").to_pylist() == here.column("id").to_pylist()
        np.testing.assert_allclose(
            remote.column("ez_score").to_numpy(),
            here.column("ez_score").to_numpy(),
            rtol=1e-6,
            atol=1e-12,
        )
        assert remote.column("ez_status").to_pylist() == here.column("ez_status").to_pylist()
    index = read_s3_table(s3, f"s3://{staged['bucket']}/audits/index/")
    local_index = tmp_path / "index.parquet"
    pq.write_table(index, local_index)
    rows = duckdb.sql(
        f"select checkpoint, n, ez_score_auc from '{local_index}' order by 1"
    ).fetchall()
    assert [r[0] for r in rows] == ["full", "lora"]
    assert all(r[1] == pq.read_table(models.eval).num_rows and 0 <= r[2] <= 1 for r in rows)
    ours = process_tree()
    assert listeners_off_loopback(cluster.listener_baseline, pids=ours) == []
    assert sockets_off_loopback(ours) == []


def _scoring_actors() -> list[int]:
    """Scoring actor processes of this test run (never another session's)."""
    found = subprocess.run(
        ["pgrep", "-f", "MapBatches\\(.*ModelStage\\)"], capture_output=True, text=True
    ).stdout.split()
    ours = process_tree()
    return [int(pid) for pid in found if int(pid) in ours]


def _kill_scoring_actor_once(deadline: float, killed: list[int]) -> None:
    while time.time() < deadline and not killed:
        found = _scoring_actors()
        if found:
            time.sleep(3)  # let it load the models and start scoring
            os.kill(found[0], signal.SIGKILL)
            killed.append(found[0])
        time.sleep(0.2)


def test_killed_scoring_actor_is_replaced_and_every_row_scored_once(
    cluster, s3, staged, models, tmp_path
):
    rows = pq.read_table(models.eval)
    big = pa.concat_tables(
        [
            rows.set_column(0, "id", pa.array([f"{i}-{v}" for v in rows.column("id").to_pylist()]))
            for i in range(6)
        ]
    )
    buffer = io.BytesIO()
    pq.write_table(big, buffer)
    s3.client().put_object(
        Bucket=staged["bucket"], Key="data/big/part-0.parquet", Body=buffer.getvalue()
    )
    spec = {
        "out": f"s3://{staged['bucket']}/fault/",
        "date": "2026-01-03",
        "audits": [
            {
                "name": "full",
                "target": staged["full"],
                "reference": staged["base"],
                "data": [f"s3://{staged['bucket']}/data/big/"],
                "id_column": "id",
                "label_column": "is_member",
                "max_length": 64,
                "bootstrap_rounds": 0,
                "engine": "ray",
                "batch_size": 2,
                "ray": {"max_actors": 1, "rows_per_block": 8},
            }
        ],
    }
    job, _ = submit(cluster, s3, put_yaml(s3, staged["bucket"], "jobs/fault.yaml", spec), tmp_path)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_scoring_actor_once, args=(time.time() + 300, killed))
    killer.start()
    status, logs = cluster.wait_job(job, timeout=600)
    killer.join()
    assert killed, "no scoring actor was seen to kill"
    assert status == "SUCCEEDED", logs[-3000:]
    scores = read_s3_table(
        s3, f"s3://{staged['bucket']}/fault/date=2026-01-03/checkpoint=full/scores/"
    )
    ids = scores.column("id").to_pylist()
    assert len(ids) == big.num_rows and len(set(ids)) == len(ids)
    assert set(ids) == set(big.column("id").to_pylist())


def _success_exists(s3, bucket: str, prefix: str) -> bool:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return any(o["Key"].endswith("/_SUCCESS") for o in listing)


def test_lost_worker_node_completes_or_fails_cleanly_and_a_resubmit_completes(
    cluster, s3, staged, models, tmp_path
):
    spec = {"out": f"s3://{staged['bucket']}/nodeloss/", "date": "2026-01-04", "audits": [{
        "name": "full", "target": staged["full"], "reference": staged["base"],
        "data": [staged["eval"]], "id_column": "id", "label_column": "is_member",
        "max_length": 64, "bootstrap_rounds": 0, "engine": "ray", "batch_size": 2,
        "ray": {"max_actors": 2, "rows_per_block": 8}}]}  # fmt: skip
    config = put_yaml(s3, staged["bucket"], "jobs/nodeloss.yaml", spec)
    job, _ = submit(cluster, s3, config, tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not _scoring_actors():
        time.sleep(0.5)
    time.sleep(3)
    cluster.remove_worker()
    try:
        status, logs = cluster.wait_job(job, timeout=600)
        prefix = "nodeloss/date=2026-01-04/checkpoint=full/"
        expected = pq.read_table(models.eval).num_rows
        if status == "SUCCEEDED":
            ids = read_s3_table(s3, f"s3://{staged['bucket']}/{prefix}scores/").column("id")
            assert len(ids) == expected and len(set(ids.to_pylist())) == expected
        else:
            assert not _success_exists(s3, staged["bucket"], prefix), logs[-2000:]
            job, _ = submit(cluster, s3, config, tmp_path)  # the same job, resubmitted
            status, logs = cluster.wait_job(job, timeout=600)
            assert status == "SUCCEEDED", logs[-3000:]
            assert _success_exists(s3, staged["bucket"], prefix)
    finally:
        cluster.add_worker()


def test_requests_the_cluster_cannot_host_are_refused_before_data_and_actor_errors_are_one_line(
    cluster, models, tmp_path, capsys
):
    """On the loopback cluster (2 nodes of 2 CPUs, no GPU): infeasible actor requests and
    devices the actors will not see are refused with the numbers before any data is read (the
    dataset path does not exist); a checkpoint that fails to load on the scoring actors ends
    in one line; errors raised in tasks keep their one-line ezmia message."""
    import json
    import shutil

    import ray
    from ray.exceptions import RayError

    from ezmia.cli import main
    from ezmia.engines.cluster import cluster_error
    from ezmia.errors import EzmiaError, InputError
    from tests.conftest import audit_args

    out = tmp_path / "out"

    def run(*extra: str, target=None, data=tmp_path / "never-read") -> str:
        args = audit_args(models, out, "--engine", "ray", "--ray-address", cluster.address,
                          *extra, data=data, target=target)  # fmt: skip
        code = main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("ezmia:")]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("ezmia: error: ")
        assert not out.exists()
        return lines[0]

    nodes = "alive nodes now: 2 x (2 CPU, 0 GPU); nodes an autoscaler has not started"
    refused = [
        (["--ray-gpus-per-actor", "1"],
         ("--ray-gpus-per-actor 1: no node of the Ray cluster has a GPU", nodes,
          "use --ray-gpus-per-actor 0")),
        (["--ray-gpus-per-actor", "1.5"], ("--ray-gpus-per-actor 1.5", "whole GPUs")),
        (["--ray-cpus-per-actor", "64"],
         ("--ray-cpus-per-actor 64: no node of the Ray cluster has that many CPUs", nodes,
          "use --ray-cpus-per-actor 2 or less")),
        (["--ray-min-actors", "9", "--ray-max-actors", "9"],
         ("--ray-min-actors 9: the Ray cluster hosts at most 8 scoring actors at once",
          "0.5 CPU and 0 GPU each", nodes, "use --ray-min-actors 8 or less")),
        (["--device", "cuda"], ("--device cuda: the scoring actors ask for no GPU",
                                "--ray-gpus-per-actor 1")),
        (["--device", "cuda:1", "--ray-gpus-per-actor", "0.5"],
         ("--device cuda:1: each scoring actor sees 1 GPU", "use --device cuda")),
        (["--device", "mps"], ("--device mps: Ray gives scoring actors CPUs and CUDA GPUs only",)),
    ]  # fmt: skip
    try:
        for extra, expected in refused:
            line = run(*extra)
            for fragment in expected:
                assert fragment in line, line

        mismatched = shutil.copytree(models.full, tmp_path / "mismatched")
        config = json.loads((mismatched / "config.json").read_text())
        config["n_inner"] = 2 * config["n_embd"]  # the weights were saved with 4 x n_embd
        (mismatched / "config.json").write_text(json.dumps(config))
        small = tmp_path / "small.parquet"
        pq.write_table(pq.read_table(models.eval).slice(0, 8), small)
        line = run(target=mismatched, data=small)
        assert line.startswith(f"ezmia: error: {mismatched}: cannot load the model"), line

        def fail(_batch: dict, kind: type, message: str) -> dict:
            raise kind(message)

        for kind, message, in_ray_data, expected_type, expected in [
            (InputError, "s3://b/data.parquet row 3: bad\nvalue; fix it", False, InputError,
             "s3://b/data.parquet row 3: bad value; fix it"),
            (InputError, "row 3: bad; fix it", True, InputError, "row 3: bad; fix it"),
            (RuntimeError, "boom\nmore", False, EzmiaError,
             "the Ray audit failed on the cluster (RuntimeError: boom); see the scoring actors'"),
            (KeyError, "'lp'", True, EzmiaError, "the Ray audit failed on the cluster (KeyError:"),
        ]:  # fmt: skip
            with pytest.raises(RayError) as raised:
                if in_ray_data:  # Ray Data wraps it in a UserCodeException of its own
                    kwargs = {"kind": kind, "message": message}
                    ray.data.range(2).map_batches(fail, fn_kwargs=kwargs).materialize()
                else:
                    ray.get(ray.remote(max_retries=0)(fail).remote({}, kind, message))
            converted = cluster_error(raised.value)
            assert type(converted) is expected_type
            assert str(converted) == expected or (
                expected_type is EzmiaError and str(converted).startswith(expected)
            ), str(converted)
    finally:
        ray.shutdown()


def test_sigterm_stops_a_ray_engine_audit_like_ctrl_c(cluster, models, tmp_path):
    """``ray.init`` replaces the SIGTERM handler with a bare ``sys.exit``: a stopped Ray job
    must still remove what it wrote and exit 130 with ezmia's line, as a local audit does."""
    out = tmp_path / "audit"
    extra = ("--engine", "ray", "--ray-address", cluster.address)
    with audit_process(models, out, *extra, copies=50) as (proc, _args):
        lines = stop_with_sigterm(proc, out)
    ours = [line for line in lines if line.startswith("ezmia:")]
    assert ours and ours[-1].startswith("ezmia: interrupted;"), lines
