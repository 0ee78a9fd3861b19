"""The Ray engine's model stages on a loopback cluster shaped like a GPU cluster: a head that
takes no work and a worker node declaring GPUs it does not have (Ray's logical ``num_gpus``),
with the models and data in a real S3 endpoint (moto server process)."""

from __future__ import annotations

import io
import logging
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia import audit as audit_module
from ezmia.config import AuditConfig
from ezmia.stats.scores import SCORES
from tests.conftest import upload_dir
from tests.infra import LOCALHOST, LocalRayCluster

pytestmark = pytest.mark.ray

WORKER_GPUS = 3


class LogicalGpuCluster(LocalRayCluster):
    """A head with no CPUs (no work) and one worker declaring ``WORKER_GPUS`` logical GPUs."""

    def add_worker(self):
        assert self.cluster is not None, "cluster not started"
        self.worker_node = self.cluster.add_node(
            node_ip_address=LOCALHOST,
            num_cpus=self.worker_cpus,
            num_gpus=WORKER_GPUS,
            object_store_memory=self.object_store_bytes,
        )
        return self.worker_node


@pytest.fixture(scope="module")
def gpu_cluster(s3):
    with LogicalGpuCluster(head_cpus=0, worker_cpus=3) as rc:
        yield rc


class WeightOpens:
    """Every ``*.safetensors`` file this process opens while ``recording`` (an audit hook:
    Python cannot remove one, so it is switched off instead)."""

    def __init__(self) -> None:
        self.recording = False
        self.opened: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.recording and event == "open" and str(args[0]).endswith(".safetensors"):
            self.opened.append(str(args[0]))


def test_model_stages_request_their_gpus_and_the_driver_never_reads_weights(
    gpu_cluster, s3, models, tmp_path, monkeypatch
):
    """Target and reference stages are separate actor pools asking for their tensor-parallel
    sizes in GPUs (2 and 1: the default on a cluster with GPUs); the driver plans from the
    models' small files and safetensors headers only (its cache deleted right after planning),
    the actors fetch the models on the worker, and the scores equal the local engine's."""
    import ray
    from ray.util.state import list_actors

    bucket = s3.make_bucket("ray-stages")
    client = s3.client()
    target = upload_dir(client, models.full, bucket, "models/full")
    reference = upload_dir(client, models.base, bucket, "models/base")
    client.upload_file(str(models.eval), bucket, "data/eval/part-0.parquet")
    cache = tmp_path / "driver-cache"
    planned_weights: list[str] = []
    plan_audit = audit_module.plan_audit

    def plan_then_forget(config):
        plan = plan_audit(config)
        planned_weights.extend(str(p) for p in cache.rglob("*.safetensors"))
        shutil.rmtree(cache)  # the actors must resolve the models themselves
        return plan

    monkeypatch.setattr(audit_module, "plan_audit", plan_then_forget)
    settings = dict(
        reference=reference,
        data=[f"s3://{bucket}/data/eval/"],
        id_column="id",
        label_column="is_member",
        max_length=64,
        bootstrap_rounds=0,
    )
    config = AuditConfig(
        target=target,
        out=f"s3://{bucket}/audits/full",
        engine="ray",
        cache_dir=str(cache),
        ray={"address": gpu_cluster.address, "rows_per_block": 16},
        vllm={"tensor_parallel_size": 2, "reference_tensor_parallel_size": 1},
        **settings,
    )
    opens = WeightOpens()
    opens.recording = True
    try:
        result = audit_module.audit(config)
        opens.recording = False
        actors = list_actors(address=gpu_cluster.dashboard_url, detail=True, limit=1000)
    finally:
        opens.recording = False
        ray.shutdown()
    assert opens.opened == [] and planned_weights == []
    requested = {
        a.class_name: a.required_resources.get("GPU")
        for a in actors
        if "ModelStage" in a.class_name
    }
    assert requested == {
        "MapWorker(MapBatches(TargetModelStage))": 2.0,
        "MapWorker(MapBatches(ReferenceModelStage))": 1.0,
    }, requested

    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=bucket, Prefix="audits/full/scores/")["Contents"]
    ]
    assert len(keys) == 8  # 120 rows in parts of 16, each named after its first source row
    remote = pa.concat_tables(
        pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read()))
        for k in keys
    ).sort_by("id")
    monkeypatch.setattr(audit_module, "plan_audit", plan_audit)
    local = audit_module.audit(
        AuditConfig(
            target=str(models.full),
            out=str(tmp_path / "local"),
            engine="local",
            **{**settings, "reference": str(models.base), "data": [str(models.eval)]},
        )
    )
    here = pq.read_table(tmp_path / "local" / "scores").sort_by("id")
    assert remote.num_rows == pq.read_table(models.eval).num_rows
    assert result.summary.backend.name == local.summary.backend.name == "torch"
    assert remote.column("id").to_pylist() == here.column("id").to_pylist()
    for score in SCORES.values():
        np.testing.assert_allclose(
            remote.column(score.column).to_numpy(),
            here.column(score.column).to_numpy(),
            rtol=1e-6,
            err_msg=score.column,
        )


def test_detection_on_ray_flags_the_same_candidates_as_the_local_engine(
    gpu_cluster, models, tmp_path, caplog
):
    """Detection on Ray: calibration non-members and candidates pass through one actor per
    model stage (the models load once), the calibration rows are never written, and every
    candidate's ``flagged`` (added after scoring, where the parts are written) equals the local
    engine's, with the same threshold and parts schema. Progress: scoring, then writing."""
    import ray
    from ray.util.state import list_actors

    def stage_actors() -> dict[str, str]:
        found = list_actors(address=gpu_cluster.dashboard_url, detail=True, limit=1000)
        return {a.actor_id: a.class_name for a in found if "ModelStage" in a.class_name}

    settings = dict(
        target=str(models.full),
        reference=str(models.base),
        data=[str(models.members)],
        calibration=[str(models.nonmembers)],
        id_column="id",
        fpr=0.05,
        max_length=64,
    )
    ray_config = dict(address=gpu_cluster.address, rows_per_block=16)
    before = stage_actors()
    try:
        with caplog.at_level(logging.WARNING, logger="ezmia.engines.pipeline"):
            remote = audit_module.audit(
                AuditConfig(out=str(tmp_path / "ray"), engine="ray", ray=ray_config, **settings)
            )
    finally:
        ray.shutdown()
    progress = [r.getMessage() for r in caplog.records if r.name == "ezmia.engines.pipeline"]
    stages = [line.split(":")[0] for line in progress]
    assert stages == sorted(stages) and set(stages) == {"scoring", "writing"}  # scoring first
    total = sum(pq.read_metadata(p).num_rows for p in (models.members, models.nonmembers))
    assert progress[stages.index("writing") - 1] == f"scoring: {total} of {total} rows (100%)"
    assert progress[-1].endswith(" rows (100%)") and progress[-1].startswith("writing: ")
    started = [name for actor, name in stage_actors().items() if actor not in before]
    assert sorted(started) == [
        "MapWorker(MapBatches(ReferenceModelStage))",
        "MapWorker(MapBatches(TargetModelStage))",
    ]
    local = audit_module.audit(AuditConfig(out=str(tmp_path / "local"), **settings))
    on_ray = pq.read_table(tmp_path / "ray" / "scores").sort_by("id")
    here = pq.read_table(tmp_path / "local" / "scores").sort_by("id")
    assert on_ray.schema.equals(here.schema)
    assert on_ray.num_rows == pq.read_table(models.members).num_rows
    assert remote.summary.detection.threshold == pytest.approx(local.summary.detection.threshold)
    assert remote.summary.detection.n_calibration == local.summary.detection.n_calibration
    assert on_ray.column("flagged").to_pylist() == here.column("flagged").to_pylist()
    assert remote.summary.detection.n_flagged == sum(here.column("flagged").to_pylist()) > 0
