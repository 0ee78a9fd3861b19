"""The output location: ezmia deletes or replaces only what it wrote, refuses a location that
holds anything else, a root, or one overlapping an input, and lets one audit at a time write.
Every refusal leaves the files and objects that were there byte for byte as they were."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ezmia.cli import main
from ezmia.data import outputs, storage
from ezmia.data.locks import Locks
from tests.conftest import audit_args, audit_process, dead_pid, stop_with_sigterm, upload_dir


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links not followed) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def s3_snapshot(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def refused(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ezmia: error: --out"), err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def personal(tmp_path) -> Path:
    """A folder of someone's files: photos, notes, a git repository."""
    root = tmp_path / "personal"
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(os.urandom(2048))
    (root / "notes.txt").write_text("do not delete")
    (root / "empty-folder").mkdir()
    return root


def test_a_folder_of_unrelated_files_is_refused_and_left_intact(models, personal, capsys):
    before = snapshot(personal)
    assert main(audit_args(models, personal)) == 2
    refused(capsys, "did not write", "choose another --out")
    assert snapshot(personal) == before
    assert (personal / "empty-folder").is_dir()


def test_overwrite_never_deletes_files_ezmia_did_not_write(models, personal, capsys):
    before = snapshot(personal)
    assert main(audit_args(models, personal, "--overwrite")) == 2
    refused(capsys, "did not write")
    assert snapshot(personal) == before


def test_a_symlinked_out_is_judged_by_what_the_link_points_to(models, personal, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(personal, target_is_directory=True)
    before = snapshot(personal)
    assert main(audit_args(models, link, "--overwrite")) == 2
    refused(capsys, "did not write")
    assert snapshot(personal) == before


def test_out_over_the_project_folder_is_refused(models, tmp_path, monkeypatch, capsys):
    """``--out .`` from a folder holding the data and the models."""
    project = tmp_path / "project"
    shutil.copytree(models.full, project / "full")
    shutil.copytree(models.base, project / "base")
    shutil.copy(models.eval, project / "eval.parquet")
    before = snapshot(project)
    monkeypatch.chdir(project)
    args = audit_args(models, ".", target="full", data="eval.parquet")
    args[args.index("--reference") + 1] = "base"
    assert main(args) == 2
    refused(capsys, "contains --data eval.parquet")
    assert snapshot(project) == before


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("data-folder", "is --data"),
        ("above-the-data", "contains --data"),
        ("inside-target", "lies inside --target"),
        ("the-data-file", "is a file, not a directory"),
    ],
)
def test_out_overlapping_an_input_is_refused_before_anything_is_read(
    models, tmp_path, where, expected, capsys
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(models.eval, data_dir / "eval.parquet")
    target = shutil.copytree(models.full, tmp_path / "target")
    out = {
        "data-folder": data_dir,
        "above-the-data": tmp_path,
        "inside-target": target / "audit",
        "the-data-file": data_dir / "eval.parquet",
    }[where]
    before = snapshot(tmp_path)
    assert main(audit_args(models, out, data=data_dir, target=target)) == 2
    refused(capsys, expected)
    assert snapshot(tmp_path) == before
    assert not (target / "audit").exists()


def test_out_inside_the_model_cache_is_refused(models, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(audit_args(models, cache / "audit", "--cache-dir", str(cache))) == 2
    refused(capsys, "lies inside --cache-dir")


@pytest.mark.parametrize("out", ["", "   ", "/"])
def test_an_empty_out_or_the_filesystem_root_is_refused(models, out, capsys):
    assert main(audit_args(models, out)) == 2
    refused(capsys)


def test_an_empty_out_in_yaml_is_refused(models, tmp_path, capsys):
    config = tmp_path / "audit.yaml"
    config.write_text(json.dumps({"out": ""}))
    args = [a for a in audit_args(models, "x") if a not in ("--out", "x")]
    assert main([*args, "--config", str(config)]) == 2
    refused(capsys, "empty")


def test_s3_bucket_root_and_foreign_objects_are_refused_and_kept(models, s3, bucket, capsys):
    client = s3.client()
    client.put_object(Bucket=bucket, Key="keep/me.txt", Body=b"precious")
    client.put_object(Bucket=bucket, Key="audit/theirs.csv", Body=b"a,b\n1,2\n")
    target = upload_dir(client, models.full, bucket, "models/full")
    before = s3_snapshot(s3, bucket)
    for out, expected in [
        (f"s3://{bucket}", "bucket root"),
        (f"s3://{bucket}/", "bucket root"),
        (f"s3://{bucket}/audit", "did not write"),
        (f"{target}/audit", "lies inside --target"),
        (f"s3://{bucket}/models", "contains --target"),
    ]:
        assert main(audit_args(models, out, target=target, max_length=32)) == 2, out
        refused(capsys, expected)
        assert s3_snapshot(s3, bucket) == before, out


def test_an_audit_lists_what_it_wrote_in_its_manifest(models, tmp_path):
    out = tmp_path / "audit"
    assert main(audit_args(models, out)) == 0
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == written - {outputs.MANIFEST}
    assert not (out / outputs.LOCK).exists()


def test_overwrite_replaces_only_ezmias_own_files(models, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(audit_args(models, out)) == 0
    capsys.readouterr()
    (out / "scores" / "part-00099.parquet").write_bytes(b"left by an older run")
    (out / "README.txt").write_text("a note someone added")
    assert main(audit_args(models, out, "--overwrite")) == 2
    refused(capsys, "did not write")
    assert (out / "README.txt").read_text() == "a note someone added"
    (out / "README.txt").unlink()
    (out / "scores" / "part-00099.parquet").unlink()
    stale = out / "scores" / "part-00042.parquet"
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    (out / outputs.MANIFEST).write_text(
        json.dumps({**manifest, "files": [*manifest["files"], "scores/part-00042.parquet"]})
    )
    stale.write_bytes(b"a part of an earlier run")
    assert main(audit_args(models, out, "--overwrite")) == 0
    assert not stale.exists()
    assert (out / outputs.SUCCESS).exists()


def test_an_unfinished_run_is_replaced_without_overwrite(models, tmp_path):
    out = tmp_path / "audit"
    out.mkdir()
    (out / "scores").mkdir()
    (out / "scores" / "part-00007.parquet").write_bytes(b"half")
    (out / "scores" / ".part-00007.parquet.tmp-123").write_bytes(b"hal")
    (out / outputs.MANIFEST).write_text(json.dumps({"files": ["scores/part-00007.parquet"]}))
    assert main(audit_args(models, out)) == 0
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["part-00000.parquet"]


def test_an_output_of_an_older_ezmia_without_manifest_can_be_overwritten(models, tmp_path):
    out = tmp_path / "audit"
    assert main(audit_args(models, out)) == 0
    (out / outputs.MANIFEST).unlink()
    shutil.copy(out / "scores" / "part-00000.parquet", out / "scores" / "part-00003.parquet")
    assert main(audit_args(models, out, "--overwrite")) == 0
    assert not (out / "scores" / "part-00003.parquet").exists()


def test_files_named_like_outputs_but_without_scores_are_not_taken_for_ezmias(
    models, tmp_path, capsys
):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "own summary"}')
    assert main(audit_args(models, out, "--overwrite")) == 2
    refused(capsys, "did not write")
    assert (out / "summary.json").read_text() == '{"my": "own summary"}'


@pytest.mark.parametrize("existed", [True, False])
def test_an_audit_that_fails_midway_removes_what_it_wrote(models, tmp_path, monkeypatch, existed):
    """A folder that was there stays (empty); one the audit created goes."""
    out = tmp_path / "audit"
    if existed:
        out.mkdir()
    from ezmia.engines import local

    def crash(*_args, **_kwargs):
        raise RuntimeError("scoring crashed")

    monkeypatch.setattr(local, "score_rows", crash)
    with pytest.raises(RuntimeError, match="scoring crashed"):
        main(audit_args(models, out))
    assert out.is_dir() == existed
    assert not existed or list(out.iterdir()) == []


def test_a_second_writer_is_refused_while_the_first_holds_the_location(models, tmp_path, capsys):
    out = tmp_path / "audit"
    out.mkdir()
    other = Locks(str(out), {"holder": "ezmia audit"}, outputs.LOCK_TTL_S, storage.Encryption())
    lock = other.acquire_at(str(out / outputs.LOCK))
    try:
        assert main(audit_args(models, out)) == 2
        refused(capsys, "being audited by ezmia audit", f"pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [outputs.LOCK]
    finally:
        other.release(lock)
    assert main(audit_args(models, out)) == 0


def test_a_lock_of_a_process_that_died_is_taken_over(models, tmp_path):
    out = tmp_path / "audit"
    out.mkdir()
    owner = {"holder": "ezmia audit", "pid": dead_pid(), "token": "t", "host": os.uname()[1]}
    (out / outputs.LOCK).write_text(json.dumps(owner))
    assert main(audit_args(models, out)) == 0


def test_sigterm_stops_an_audit_like_ctrl_c_and_a_second_writer_is_refused_meanwhile(
    models, tmp_path, capsys
):
    out = tmp_path / "audit"
    with audit_process(models, out, copies=200) as (proc, args):
        assert main(args) == 2
        refused(capsys, "being audited by ezmia audit", f"pid {proc.pid}")
        assert "interrupted" in stop_with_sigterm(proc, out)[-1]


def test_two_audits_started_together_end_with_one_complete_output(models, tmp_path):
    out = tmp_path / "audit"
    codes: list[int] = []

    def run() -> None:
        codes.append(main(audit_args(models, out)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [0, 2]
    scores = pq.read_table(out / "scores")
    summary = json.loads((out / "summary.json").read_text())
    assert scores.num_rows == summary["n_rows"] == pq.read_metadata(models.eval).num_rows


@pytest.mark.parametrize(
    "listed", ["../victim.txt", "/etc/hostname", "scores/../../victim.txt", "notes.txt", 7]
)
def test_a_manifest_naming_other_files_is_refused_and_nothing_is_deleted(
    models, tmp_path, listed, capsys
):
    """A tampered or foreign manifest can never make ezmia delete what it lists."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "audit"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / outputs.MANIFEST).write_text(json.dumps({"files": [listed, "summary.json"]}))
    before = snapshot(tmp_path)
    assert main(audit_args(models, out, "--overwrite")) == 2
    refused(capsys, "unreadable ezmia manifest", "choose another --out")
    assert snapshot(tmp_path) == before
