"""``ezmia batch``: audits side by side on a two-node loopback Ray cluster, a killed scoring
actor in one of them, the default number in flight, and a failing audit among local ones."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ezmia.config import AuditConfig
from ezmia.data.outputs import LOCK, SUCCESS
from ezmia.fleet.batch import default_in_flight, run_batch
from tests.infra import LocalRayCluster, process_tree


@pytest.fixture(scope="module")
def cluster():
    import ray

    with LocalRayCluster(head_cpus=2, worker_cpus=2) as rc:
        try:
            yield rc
        finally:
            ray.shutdown()


def write_batch(path: Path, out: Path, defaults: dict, audits: list[dict], **keys) -> str:
    spec = {"out": str(out), "date": "2026-02-01", "defaults": defaults, "audits": audits, **keys}
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def location(out: Path, name: str) -> Path:
    return out / "date=2026-02-01" / f"checkpoint={name}"


def index_rows(out: Path) -> list[dict]:
    parts = sorted((out / "index").rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() if parts else []


def ray_defaults(cluster, models, data, rows_per_block: int, **extra) -> dict:
    return {
        "reference": str(models.base), "data": [str(data)], "id_column": "id",
        "label_column": "is_member", "max_length": 64, "bootstrap_rounds": 0, "engine": "ray",
        "ray": {"address": cluster.address, "max_actors": 1, "rows_per_block": rows_per_block},
        **extra,
    }  # fmt: skip


def watch_locks(locations: list[Path], stop: threading.Event, most: list[int]) -> None:
    """The most audits seen holding their output lock (running) at one moment."""
    while not stop.is_set():
        most[0] = max(most[0], sum((where / LOCK).exists() for where in locations))
        time.sleep(0.05)


@pytest.mark.ray
def test_side_by_side_batch_matches_one_at_a_time_with_one_index_row_each(
    cluster, models, tmp_path, capsys
):
    audits = [{"name": "full", "target": str(models.full)},
              {"name": "lora", "target": str(models.lora)},
              {"name": "full-again", "target": str(models.full)}]  # fmt: skip
    defaults = ray_defaults(cluster, models, models.eval, rows_per_block=32)
    serial, side = tmp_path / "serial", tmp_path / "side"
    assert (
        run_batch(write_batch(tmp_path / "1.yaml", serial, defaults, audits, max_in_flight=1)) == 0
    )
    names = [a["name"] for a in audits]
    stop, most = threading.Event(), [0]
    watcher = threading.Thread(
        target=watch_locks, args=([location(side, n) for n in names], stop, most)
    )
    watcher.start()
    try:
        code = run_batch(write_batch(tmp_path / "n.yaml", side, defaults, audits))  # default
    finally:
        stop.set()
        watcher.join()
    assert code == 0
    assert most[0] >= 2, "the audits never ran side by side"
    lines = capsys.readouterr().out.splitlines()[-4:]
    for name, line in zip(names, lines[:3], strict=True):
        assert line.endswith(f" {name}: {location(side, name) / 'report.html'}"), line
    assert lines[3].startswith(f"3 audits indexed in {side / 'index'}/date=")
    assert lines[3].endswith("; 0 failed")
    for name in names:
        one = pq.read_table(location(serial, name) / "scores").sort_by("id")
        other = pq.read_table(location(side, name) / "scores").sort_by("id")
        assert one.num_rows == other.num_rows == pq.read_table(models.eval).num_rows
        assert one.column("id").equals(other.column("id"))
        assert one.column("ez_status").equals(other.column("ez_status"))
        np.testing.assert_allclose(
            one.column("ez_score").to_numpy(), other.column("ez_score").to_numpy(), rtol=1e-6
        )
    for out in (serial, side):
        rows = index_rows(out)
        assert sorted(r["checkpoint"] for r in rows) == sorted(names)
        assert {r["report_uri"] for r in rows} == {
            str(location(out, n) / "report.html") for n in names
        }


def four_times_the_eval_set(models, path: Path) -> Path:
    """The eval set four times over, under new ids: audits long enough to act on mid-run."""
    rows = pq.read_table(models.eval)
    ids = rows.column("id").to_pylist()
    copies = [rows.set_column(0, "id", pa.array([f"{i}-{v}" for v in ids])) for i in range(4)]
    pq.write_table(pa.concat_tables(copies), path)
    return path


def kill_one_scoring_actor(deadline: float, killed: list[int]) -> None:
    """SIGKILL the first scoring actor of this test run seen scoring (never another
    session's)."""
    while time.time() < deadline and not killed:
        found = subprocess.run(
            ["pgrep", "-f", r"MapWorker\(MapBatches\("], capture_output=True, text=True
        ).stdout.split()
        ours = [int(pid) for pid in found if int(pid) in process_tree()]
        if ours:
            time.sleep(3)  # let it load the models and start scoring
            with contextlib.suppress(ProcessLookupError):  # done already: look for another
                os.kill(ours[0], signal.SIGKILL)
                killed.append(ours[0])
        time.sleep(0.2)


@pytest.mark.ray
def test_a_killed_scoring_actor_leaves_every_audit_complete_or_one_failed_cleanly(
    cluster, models, tmp_path, capsys
):
    path = four_times_the_eval_set(models, tmp_path / "big.parquet")
    big = pq.read_table(path)
    defaults = ray_defaults(cluster, models, path, 8, batch_size=2)
    names = ["full", "lora", "full-again"]
    audits = [
        {"name": n, "target": str(models.lora if n == "lora" else models.full)} for n in names
    ]
    out = tmp_path / "out"
    killed: list[int] = []
    killer = threading.Thread(target=kill_one_scoring_actor, args=(time.time() + 300, killed))
    killer.start()
    code = run_batch(write_batch(tmp_path / "b.yaml", out, defaults, audits, max_in_flight=3))
    killer.join()
    assert killed, "no scoring actor was seen to kill"
    lines = capsys.readouterr().out.splitlines()[-4:]
    failed = [line for line in lines if line.startswith("FAILED ")]
    assert code == (1 if failed else 0) and len(failed) <= 1, lines
    done = [n for n in names if not any(line.startswith(f"FAILED {n}:") for line in failed)]
    assert lines[3].endswith(f"; {len(failed)} failed")
    for name in names:
        complete = (location(out, name) / SUCCESS).exists()
        assert complete == (name in done), name
        if complete:
            ids = pq.read_table(location(out, name) / "scores").column("id").to_pylist()
            assert sorted(ids) == sorted(big.column("id").to_pylist())  # each row once
    assert sorted(r["checkpoint"] for r in index_rows(out)) == sorted(done)


def test_default_in_flight_fills_the_gpus_or_cpus_the_model_stages_ask_for(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    def configs(n: int, target: Path = tmp_path / "full", **ray) -> list[AuditConfig]:
        return [AuditConfig(target=str(target), data=["d"], out=str(tmp_path / str(i)), ray=ray)
                for i in range(n)]  # fmt: skip

    # a full target has two stages (target, reference), a LoRA target one (its base)
    full = configs(20, max_actors=8, gpus_per_actor=1, cpus_per_actor=4)
    assert default_in_flight(full, {"CPU": 8 * 96, "GPU": 64}) == 4
    assert default_in_flight(configs(20, adapter, max_actors=8), {"CPU": 768, "GPU": 64}) == 8
    assert default_in_flight(full, {"CPU": 64, "GPU": 64}) == 1  # 63 CPUs: less than 2 x 32
    half_gpus = configs(20, max_actors=2, gpus_per_actor=0.25)
    assert default_in_flight(half_gpus, {"CPU": 100, "GPU": 3}) == 3
    cpu_pools = configs(20, adapter, max_actors=2, cpus_per_actor=0.5)
    assert default_in_flight(cpu_pools, {"CPU": 4}) == 3  # one CPU left for the tasks
    assert default_in_flight(cpu_pools[:2], {"CPU": 64}) == 2
    assert default_in_flight(configs(3), {"CPU": 1}) == 1


def test_a_failing_local_audit_leaves_the_others_indexed_and_exits_1(models, tmp_path, capsys):
    defaults = {"reference": str(models.base), "data": [str(models.eval)], "id_column": "id",
                "label_column": "is_member", "max_length": 64, "bootstrap_rounds": 0,
                "engine": "local"}  # fmt: skip
    audits = [{"name": "full", "target": str(models.full)},
              {"name": "broken", "target": str(tmp_path / "no-such-model")},
              {"name": "lora", "target": str(models.lora)}]  # fmt: skip
    out = tmp_path / "out"
    code = run_batch(write_batch(tmp_path / "b.yaml", out, defaults, audits, max_in_flight=2))
    lines = capsys.readouterr().out.splitlines()[-4:]
    assert code == 1
    assert lines[0].endswith(f" full: {location(out, 'full') / 'report.html'}")
    assert lines[1].startswith(f"FAILED broken: {tmp_path / 'no-such-model'}")
    assert lines[2].endswith(f" lora: {location(out, 'lora') / 'report.html'}")
    assert lines[3].startswith("2 audits indexed in ") and lines[3].endswith("; 1 failed")
    assert sorted(r["checkpoint"] for r in index_rows(out)) == ["full", "lora"]
    assert not location(out, "broken").exists()


@pytest.mark.ray
def test_an_interrupted_side_by_side_batch_removes_what_its_running_audits_wrote(
    cluster, models, tmp_path
):
    big = four_times_the_eval_set(models, tmp_path / "big.parquet")  # scoring when interrupted
    defaults = ray_defaults(cluster, models, big, 8, batch_size=2)
    names = ["full", "lora"]
    audits = [{"name": n, "target": str(getattr(models, n))} for n in names]
    out = tmp_path / "out"
    main = threading.main_thread().ident

    def interrupt_when_both_run() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if all((location(out, n) / LOCK).exists() for n in names):
                time.sleep(1)  # into scoring
                signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C, as the CLI gets it
                return
            time.sleep(0.05)

    interrupter = threading.Thread(target=interrupt_when_both_run)
    # Python's own Ctrl-C handler, as the CLI has it (vLLM's tests replace it in this process)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_batch(write_batch(tmp_path / "b.yaml", out, defaults, audits, max_in_flight=2))
    finally:
        signal.signal(signal.SIGINT, previous)
    interrupter.join()
    assert [p for p in out.rglob("*") if p.is_file()] == []
    assert not (out / "index").exists()
