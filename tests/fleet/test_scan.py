"""The nightly scan: discovery, sidecars and rules, ledger, unchanged detection, policy
verdicts and alerts, resuming after a killed scan, concurrent scans, S3. The locks' own
behaviour is tested in tests/data/test_locks.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ezmia.data import storage
from ezmia.data.locks import Locks
from ezmia.data.schema import LEDGER_SCHEMA
from ezmia.errors import OutputError
from ezmia.fleet.index import report_location
from ezmia.fleet.policy import load_policy
from ezmia.fleet.registry import discover
from ezmia.fleet.scan import lock_key, run_scan
from tests.conftest import REPO, dead_pid, upload_dir

LENIENT = {"thresholds": {"max_tpr_at_0_1pct_fpr": 1.0, "max_tpr_at_1pct_fpr": 1.0, "max_auc": 1.0}}
TINY = {"max_length": 32, "bootstrap_rounds": 5, "batch_size": 8}


@pytest.fixture(scope="session")
def data(models, tmp_path_factory) -> dict[str, str]:
    """20 members and 20 non-members: audits stay tiny."""
    root = tmp_path_factory.mktemp("scan-data")
    files = {}
    for name in ("members", "nonmembers"):
        files[name] = str(root / f"{name}.parquet")
        pq.write_table(pq.read_table(getattr(models, name)).slice(0, 20), files[name])
    return files


def add_checkpoint(registry: Path, name: str, source: Path, **sidecar) -> Path:
    """Copy a checkpoint into the registry, with an ``ezmia.yaml`` when options are given."""
    folder = registry / name
    shutil.copytree(source, folder)
    if sidecar:
        (folder / "ezmia.yaml").write_text(yaml.safe_dump({**TINY, **sidecar}))
    return folder


def write_policy(path: Path, policy: dict) -> str:
    path.write_text(yaml.safe_dump(policy))
    return str(path)


@pytest.fixture
def registry(tmp_path, models, data) -> Path:
    """Two checkpoints with sidecars (full, LoRA) and one without."""
    root = tmp_path / "registry"
    add_checkpoint(root, "team-a/full", models.full, reference=str(models.base), **data)
    add_checkpoint(root, "team-a/lora", models.lora, **data)
    add_checkpoint(root, "team-b/full", models.full)
    return root


def ledger(out: str) -> list[dict]:
    """Every ledger row under ``out`` (local or S3), oldest scan first."""
    files = [f for f in storage.list_files(storage.join(out, "ledger")) if f.endswith(".parquet")]
    rows = [r for f in files for r in pq.read_table(pa.BufferReader(storage.read_bytes(f)))
            .to_pylist()]  # fmt: skip
    return sorted(rows, key=lambda r: (r["scan_id"], r["checkpoint"]))


def last_scan(out: str) -> dict[str, dict]:
    rows = ledger(out)
    return {r["checkpoint"]: r for r in rows if r["scan_id"] == rows[-1]["scan_id"]}


def statuses(out: str) -> dict[str, str]:
    return {name: row["status"] for name, row in last_scan(out).items()}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.parquet")}


def doc_query(title: str, out: str) -> list[dict]:
    """Run a DuckDB query of docs/analytics.md (``-- duckdb: <title>``) against ``out``."""
    blocks = (REPO / "docs/analytics.md").read_text().split("```sql\n")[1:]
    queries = {b.split("\n", 1)[0].removeprefix("-- duckdb: "): b.split("```")[0] for b in blocks}
    result = duckdb.sql(queries[title].replace("s3://audits", out))
    return [dict(zip(result.columns, row, strict=True)) for row in result.fetchall()]


def test_scan_audits_new_and_changed_checkpoints_once(tmp_path, registry, models, capsys):
    out, policy = str(tmp_path / "out"), write_policy(tmp_path / "policy.yaml", LENIENT)
    assert run_scan(str(registry), out, policy, "local") == 0
    first = last_scan(out)
    assert statuses(out) == {"team-a/full": "audited", "team-a/lora": "audited",
                             "team-b/full": "skipped"}  # fmt: skip
    assert "no audit data" in first["team-b/full"]["reason"]
    assert "ezmia.yaml" in first["team-b/full"]["reason"]
    printed = capsys.readouterr().out
    assert "skipped" in printed and "no audit data" in printed and "report.html" in printed
    assert {first[n]["kind"] for n in ("team-a/full", "team-a/lora")} == {"full", "lora"}
    assert all(first[n]["verdict"] == "pass" for n in ("team-a/full", "team-a/lora"))

    before = snapshot(Path(out))
    assert run_scan(str(registry), out, policy, "local") == 0
    assert statuses(out) == {"team-a/full": "unchanged", "team-a/lora": "unchanged",
                             "team-b/full": "skipped"}  # fmt: skip

    # new weights (a rewrite: new mtime; a copy of the base would leave nothing to score)
    shutil.copy(models.full / "model.safetensors", registry / "team-a/full/model.safetensors")
    assert run_scan(str(registry), out, policy, "local") == 0
    third = last_scan(out)
    assert statuses(out) == {"team-a/full": "audited", "team-a/lora": "unchanged",
                             "team-b/full": "skipped"}  # fmt: skip
    assert third["team-a/full"]["fingerprint"] != first["team-a/full"]["fingerprint"]
    assert third["team-a/full"]["report_uri"] != first["team-a/full"]["report_uri"]
    assert all(snapshot(Path(out)).get(f) == h for f, h in before.items())  # never rewritten
    assert not list(Path(out, "alerts").glob("*/*"))

    audits = doc_query("every audit of the nightly scan, with its index row", out)
    assert [(a["checkpoint"], a["kind"]) for a in audits] == [
        ("team-a/full", "full"), ("team-a/lora", "lora"), ("team-a/full", "full")
    ]  # fmt: skip
    assert all(Path(a["report_uri"]).with_name("_SUCCESS").exists() for a in audits)


def test_policy_breach_exits_non_zero_and_writes_alerts(tmp_path, models, data, capsys):
    registry = tmp_path / "registry"
    add_checkpoint(registry, "team-b/lora", models.lora)  # audit data from the policy's rule
    policy = write_policy(tmp_path / "policy.yaml", {
        "thresholds": {"max_auc": 0.0},
        "rules": [{"match": "team-b/*", **TINY, **data}],
    })  # fmt: skip
    out = str(tmp_path / "out")
    assert run_scan(str(registry), out, policy, "local") == 1
    (alerts,) = Path(out, "alerts").glob("date=*/alerts-*.json")
    (alert,) = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert alert["checkpoint"] == "team-b/lora" and alert["verdict"] == "fail"
    assert alert["ez_auc"] > 0 and "max_auc" in alert["reason"]
    assert Path(alert["report_uri"]).exists()
    assert "fail team-b/lora" in " ".join(capsys.readouterr().out.split())
    (failed,) = doc_query("which checkpoints failed this week", out)
    assert failed["report_uri"] == alert["report_uri"]
    assert doc_query("alerts of the last 7 days", out)[0]["checkpoint"] == "team-b/lora"
    (lora,) = doc_query("LoRA vs full fine-tuning", out)
    assert lora["kind"] == "lora" and lora["audits"] == 1
    (base,) = doc_query("leakage by base model", out)
    assert base["base_model"] == str(models.base.resolve())
    assert (
        doc_query("current state of every checkpoint (its latest ledger row)", out)[0]["verdict"]
        == "fail"
    )

    assert run_scan(str(registry), out, policy, "local") == 1  # still failing, though unchanged
    assert statuses(out) == {"team-b/lora": "unchanged"}
    (again,) = [a for a in Path(out, "alerts").glob("date=*/alerts-*.json") if a != alerts]
    (alert,) = [json.loads(line) for line in again.read_text().splitlines()]
    assert (alert["checkpoint"], alert["status"], alert["verdict"]) == (
        "team-b/lora",
        "unchanged",
        "fail",
    )
    assert "max_auc" in alert["reason"]

    rule = {"match": "team-b/*", **TINY, **data}
    lenient = write_policy(tmp_path / "policy.yaml", {**LENIENT, "rules": [rule]})
    assert run_scan(str(registry), out, lenient, "local") == 0  # judged by today's policy
    (row,) = last_scan(out).values()
    assert (row["status"], row["verdict"]) == ("unchanged", "pass")


def test_docs_describe_every_ledger_column():
    text = (REPO / "docs/analytics.md").read_text()
    assert [c for c in LEDGER_SCHEMA.names if f"`{c}`" not in text] == []


def index_rows(out: str) -> list[dict]:
    result = duckdb.sql(f"SELECT * FROM read_parquet('{out}/index/*/*.parquet')")
    return [dict(zip(result.columns, row, strict=True)) for row in result.fetchall()]


def test_audit_with_too_few_scored_rows_is_a_failed_audit_every_scan(tmp_path, models, data):
    registry = tmp_path / "registry"
    add_checkpoint(registry, "short", models.lora, **data, max_length=2)  # every row too_short
    out, policy = str(tmp_path / "out"), write_policy(tmp_path / "policy.yaml", LENIENT)
    for _ in range(2):  # a failed audit is retried, never carried over as unchanged
        assert run_scan(str(registry), out, policy, "local") == 1
        row = last_scan(out)["short"]
        assert (row["status"], row["verdict"], row["leakage"]) == ("failed", "fail", "insufficient")
        assert "insufficient" in row["reason"]
        assert "0 members and 0 non-members were scored" in row["reason"]
        assert Path(row["report_uri"]).exists()
    alerts = sorted(Path(out, "alerts").glob("date=*/alerts-*.json"))
    assert [json.loads(a.read_text())["checkpoint"] for a in alerts] == ["short", "short"]
    (indexed,) = index_rows(out)  # the retry rewrote its own index row
    assert indexed["verdict"] == "insufficient" and indexed["report_uri"] == row["report_uri"]


def test_scan_killed_between_index_and_ledger_leaves_one_index_row(tmp_path, models, data):
    registry = tmp_path / "registry"
    add_checkpoint(registry, "lora", models.lora, **data)
    out, policy = tmp_path / "out", write_policy(tmp_path / "policy.yaml", LENIENT)
    out.mkdir()
    (out / "ledger").write_text("in the way")  # the ledger append fails: the scan dies there
    with pytest.raises(OutputError, match="ledger"):
        run_scan(str(registry), str(out), policy, "local")
    assert [r["checkpoint"] for r in index_rows(str(out))] == ["lora"]
    (out / "ledger").unlink()
    assert run_scan(str(registry), str(out), policy, "local") == 0
    row = last_scan(str(out))["lora"]
    assert row["status"] == "audited"
    (indexed,) = index_rows(str(out))
    assert indexed["report_uri"] == row["report_uri"]
    assert not list(Path(out, "locks").iterdir())


class RunsCode:
    """Unpickling this writes the marker file: pickle weights that run code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",)


def hostile_checkpoint(registry: Path, name: str, models, marker: Path, *, pickle: bool) -> Path:
    """A checkpoint that runs code when loaded: a LoRA adapter with pickle weights that write
    ``marker`` when unpickled, or a full checkpoint with custom code (``auto_map`` and a
    module that writes it when imported)."""
    import pickle as pickle_module

    folder = registry / name
    shutil.copytree(models.lora if pickle else models.full, folder)
    if pickle:
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(pickle_module.dumps(RunsCode(marker)))
        return folder
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "hostile.Config", "AutoModelForCausalLM": "hostile.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hostile.py").write_text(f"open({str(marker)!r}, 'w').write('module ran')\n")
    return folder


def test_checkpoint_cannot_turn_on_remote_code_or_pickle_and_its_code_never_runs(
    tmp_path, models, data
):
    registry, marker = tmp_path / "registry", tmp_path / "code-ran"
    audit_data = {**TINY, **data, "reference": str(models.base)}
    for name, pickle, key in [("remote-code", False, "trust_remote_code"),
                              ("pickle", True, "allow_pickle")]:  # fmt: skip
        folder = hostile_checkpoint(registry, name, models, marker, pickle=pickle)
        (folder / "ezmia.yaml").write_text(yaml.safe_dump({**audit_data, key: True}))
    hostile_checkpoint(registry, "remote-code-by-rule", models, marker, pickle=False)
    policy = write_policy(tmp_path / "policy.yaml", {
        **LENIENT, "rules": [{"match": "remote-code-by-rule", **audit_data}]})  # fmt: skip
    out = str(tmp_path / "out")
    assert run_scan(str(registry), out, policy, "local") == 1
    rows = last_scan(out)
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(rows, "failed")
    for name, key in [("remote-code", "trust_remote_code"), ("pickle", "allow_pickle")]:
        assert f"{key}: a checkpoint's sidecar may not set it, only the operator's policy" in (
            rows[name]["reason"])  # fmt: skip
    assert "declares custom code (auto_map)" in rows["remote-code-by-rule"]["reason"]
    (alerts,) = Path(out, "alerts").glob("date=*/alerts-*.json")
    assert len(alerts.read_text().splitlines()) == 3
    assert not marker.exists()


def test_bad_config_and_audit_errors_are_recorded_and_scan_continues(tmp_path, models, data):
    registry = tmp_path / "registry"
    add_checkpoint(registry, "a-typo", models.lora, membrs=data["members"])
    add_checkpoint(registry, "b-noref", models.full, **data)  # full checkpoint, no reference
    add_checkpoint(registry, "c-none", models.lora)
    out = str(tmp_path / "out")
    for _ in range(2):  # failures are retried by the next scan, never "unchanged"
        assert run_scan(str(registry), out, None, "local") == 1
        rows = last_scan(out)
        assert statuses(out) == {"a-typo": "failed", "b-noref": "failed", "c-none": "skipped"}
        assert "membrs" in rows["a-typo"]["reason"]
        assert "needs --reference" in rows["b-noref"]["reason"]
    alerts = sorted(Path(out, "alerts").glob("date=*/*.json"))
    assert len(alerts) == 2 and len(alerts[0].read_text().splitlines()) == 2

    bad_policy = write_policy(tmp_path / "bad.yaml", {"thresholds": {"max_aucc": 0.5}})
    with pytest.raises(Exception, match="max_aucc"):
        load_policy(bad_policy)


def test_killed_scan_is_resumed(tmp_path, models, data):
    registry = tmp_path / "registry"
    add_checkpoint(registry, "lora", models.lora, **data)
    out = str(tmp_path / "out")
    (ckpt,) = discover(str(registry))
    lock = Path(out, "locks", f"{lock_key(ckpt)}.lock")
    lock.parent.mkdir(parents=True)
    killed = Locks(out, {"scan_id": "killed"}, 3600, storage.Encryption()).owner
    lock.write_text(json.dumps({**killed, "token": "t"}))  # a live process holds it
    assert run_scan(str(registry), out, None, "local") == 0
    assert "being audited by scan killed" in last_scan(out)["lora"]["reason"]

    lock.write_text(json.dumps({**killed, "pid": dead_pid(), "token": "t"}))  # owner died
    partial = Path(report_location(out, f"lora-{ckpt.fingerprint[:8]}"))
    (partial / "scores").mkdir(parents=True)
    (partial / "scores" / "part-00009.parquet").write_bytes(b"half-written")
    assert run_scan(str(registry), out, write_policy(tmp_path / "p.yaml", LENIENT), "local") == 0
    row = last_scan(out)["lora"]
    assert row["status"] == "audited" and Path(row["report_uri"]).parent == partial
    assert (partial / "_SUCCESS").exists() and not (partial / "scores/part-00009.parquet").exists()
    assert not lock.exists()


def test_concurrent_scans_audit_each_checkpoint_once(tmp_path, models, data):
    registry = tmp_path / "registry"
    add_checkpoint(registry, "full", models.full, reference=str(models.base), **data)
    add_checkpoint(registry, "lora", models.lora, **data)
    out, policy = str(tmp_path / "out"), write_policy(tmp_path / "policy.yaml", LENIENT)
    args = ["--registry", str(registry), "--out", out, "--policy", policy, "--engine", "local"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    commands = [[sys.executable, "-m", "ezmia", "scan", *args],
                [sys.executable, str(REPO / "jobs/nightly_scan.py"), *args]]  # fmt: skip
    procs = [subprocess.Popen(c, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    audited = [r["checkpoint"] for r in ledger(out) if r["status"] == "audited"]
    assert sorted(audited) == ["full", "lora"], logs
    index = duckdb.sql(f"SELECT checkpoint FROM read_parquet('{out}/index/*/*.parquet')")
    assert sorted(r[0] for r in index.fetchall()) == ["full", "lora"]
    assert not list(Path(out, "locks").iterdir())


def test_scan_on_s3(tmp_path, s3, bucket, models, data, monkeypatch):
    monkeypatch.setenv("EZMIA_CACHE", str(tmp_path / "cache"))
    client = s3.client()
    for name, path in data.items():  # a dataset is a prefix of Parquet files
        client.upload_file(path, bucket, f"data/{name}/part-0.parquet")
    remote = {name: f"s3://{bucket}/data/{name}/" for name in data}
    local = tmp_path / "registry"
    add_checkpoint(local, "team-a/lora", models.lora, **remote)
    add_checkpoint(local, "team-b/full", models.full)
    registry = upload_dir(client, local, bucket, "registry")
    out = f"s3://{bucket}/audits"
    policy = write_policy(tmp_path / "policy.yaml", LENIENT)
    assert run_scan(registry, out, policy, "local") == 0
    assert statuses(out) == {"team-a/lora": "audited", "team-b/full": "skipped"}
    assert storage.exists(last_scan(out)["team-a/lora"]["report_uri"])
    assert run_scan(registry, out, policy, "local") == 0
    assert statuses(out) == {"team-a/lora": "unchanged", "team-b/full": "skipped"}
