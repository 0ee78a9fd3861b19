"""``ezmia audit`` end to end on tiny real models: outputs, modes, refusals, S3 in and out."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from ezmia.cli import main
from tests.conftest import audit_args, upload_dir

SCORE_COLUMNS = [
    "id",
    "ez_score",
    "ez_status",
    "n_tokens",
    "n_scored",
    "n_errors",
    "truncated",
    "loss",
    "ref_ratio",
    "zlib",
    "min_k",
    "min_k_pp",
]


LAYOUTS = Path(__file__).parent / "summary_json"  # written by ezmia at commit efb63a9


def layout(value):
    """Keys, nesting and value types, in order."""
    if isinstance(value, dict):
        return [(key, layout(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [layout(item) for item in value]
    return type(value).__name__


def assert_layout_as_before(out, name: str) -> None:
    """``summary.json`` in ``out`` is laid out as the same audit's was before the summary was
    typed, but for ``config`` and ``versions`` (the options and the installed packages)."""
    found, before = (json.loads(p.read_text()) for p in (out / "summary.json", LAYOUTS / name))
    for summary in (found, before):
        summary["config"] = summary["versions"] = {}
    assert layout(found) == layout(before)


def run_audit(models, out, *extra, target=None):
    return main(audit_args(models, out, *extra, target=target, bootstrap_rounds=20))


@pytest.fixture(scope="module")
def full_audit(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "full"
    assert run_audit(models, out) == 0
    return out


def test_audit_writes_scores_summary_report_and_success(full_audit, models):
    assert sorted(p.name for p in full_audit.iterdir()) == [
        "_SUCCESS",
        "_ezmia_manifest.json",
        "report.html",
        "scores",
        "summary.json",
    ]
    scores = pq.read_table(full_audit / "scores")
    assert set(SCORE_COLUMNS + ["is_member", "text_sha256"]) <= set(scores.column_names)
    assert "text" not in scores.column_names
    assert scores.schema.field("ez_score").type == pa.float64()
    source = pq.read_table(models.eval)
    assert sorted(scores.column("id").to_pylist()) == sorted(source.column("id").to_pylist())


def test_every_id_keeps_its_source_row_and_label(full_audit, models):
    source = pq.read_table(models.eval).to_pylist()
    rows = pq.read_table(full_audit / "scores").to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == len(source)
    assert {r["id"]: r["is_member"] for r in rows} == {s["id"]: s["is_member"] for s in source}
    assert {r["id"]: r["source_row"] for r in rows} == {s["id"]: i for i, s in enumerate(source)}


def test_summary_json_keeps_its_layout_in_every_mode(full_audit, models, tmp_path):
    assert_layout_as_before(full_audit, "leakage.json")
    out = tmp_path / "scores-only"
    args = ["audit", "--target", str(models.full), "--reference", str(models.base),
            "--data", str(models.members), "--id-column", "id", "--out", str(out),
            "--max-length", "64"]  # fmt: skip
    assert main(args) == 0
    assert_layout_as_before(out, "scores.json")


def test_summary_counts_members_from_the_source_labels(full_audit, models):
    labels = pq.read_table(models.eval).column("is_member").to_pylist()
    summary = json.loads((full_audit / "summary.json").read_text())
    ez = summary["metrics"]["ez_score"]
    assert (ez["n"], ez["n_members"]) == (len(labels), sum(labels))
    assert summary["n_rows"] == len(labels)


def test_summary_aucs_agree_with_the_written_scores(full_audit):
    scores = pq.read_table(full_audit / "scores")
    summary = json.loads((full_audit / "summary.json").read_text())
    labels = scores.column("is_member").to_numpy(zero_copy_only=False)
    for name in ("ez_score", "loss", "ref_ratio", "zlib", "min_k", "min_k_pp"):
        values = scores.column(name).to_numpy(zero_copy_only=False)
        finite = np.isfinite(values)
        assert summary["metrics"][name]["auc"] == pytest.approx(
            roc_auc_score(labels[finite], values[finite])
        )
        low, high = summary["metrics"][name]["auc_ci95"]
        assert low <= high
    assert summary["backend"]["name"] == "torch"
    assert sum(summary["status_counts"].values()) == scores.num_rows
    assert summary["models"]["fingerprints"]["target"]


def test_full_fine_tune_is_detected_by_ez(full_audit):
    summary = json.loads((full_audit / "summary.json").read_text())
    assert summary["metrics"]["ez_score"]["auc"] > 0.7


def test_finished_output_is_refused_unless_overwrite(full_audit, models, capsys):
    before = (full_audit / "summary.json").read_text()
    assert run_audit(models, full_audit) == 2
    assert "already holds a finished audit" in capsys.readouterr().err
    assert (full_audit / "summary.json").read_text() == before


def test_lora_adapter_target_audits_on_its_base(models, tmp_path):
    out = tmp_path / "lora"
    assert run_audit(models, out, target=models.lora) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["target_is_adapter"] is True
    assert pq.read_table(out / "scores").num_rows == pq.read_table(models.eval).num_rows


def test_include_text_copies_texts_into_scores(models, tmp_path):
    out = tmp_path / "t"
    assert run_audit(models, out, "--include-text") == 0
    assert "text" in pq.read_table(out / "scores").column_names


def test_detection_mode_flags_candidates_above_the_calibration_threshold(
    models, tmp_path, full_audit
):
    out = tmp_path / "d"
    code = main(
        [
            "audit",
            "--target",
            str(models.full),
            "--reference",
            str(models.base),
            "--data",
            str(models.members),
            "--id-column",
            "id",
            "--calibration",
            str(models.nonmembers),
            "--fpr",
            "0.05",
            "--out",
            str(out),
            "--max-length",
            "64",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    scores = pq.read_table(out / "scores")
    threshold = summary["detection"]["threshold"]
    flagged = scores.column("flagged").to_numpy(zero_copy_only=False)
    assert (flagged == (scores.column("ez_score").to_numpy() > threshold)).all()
    assert summary["detection"]["n_flagged"] == int(flagged.sum())
    # The same non-members scored in the leakage audit: their 95% EZ quantile.
    leakage = pq.read_table(full_audit / "scores").to_pylist()
    nonmember_ez = [r["ez_score"] for r in leakage if not r["is_member"]]
    assert summary["detection"]["n_calibration"] == len(nonmember_ez)
    assert_layout_as_before(out, "detection.json")
    assert threshold == pytest.approx(np.quantile(nonmember_ez, 0.95), rel=1e-5)
    member_ez = {r["id"]: r["ez_score"] for r in leakage if r["is_member"]}
    assert {r["id"]: r["ez_score"] for r in scores.to_pylist()} == pytest.approx(
        member_ez, rel=1e-5
    )


def test_report_command_rerenders_from_scores(full_audit):
    (full_audit / "report.html").unlink()
    assert main(["report", str(full_audit)]) == 0
    assert "<svg" in (full_audit / "report.html").read_text()


def copy_with_summary(full_audit, tmp_path, change) -> Path:
    """A copy of ``full_audit`` whose summary.json ``change`` edited."""
    out = tmp_path / "copy"
    shutil.copytree(full_audit, out)
    summary = json.loads((out / "summary.json").read_text())
    change(summary)
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def older(summary: dict) -> None:
    """As an earlier ezmia wrote it: no host, versions or timings, no operating points or
    unresolved rates; plus a key this version does not know."""
    for key in ("host", "versions", "timings"):
        del summary[key]
    for metrics in summary["metrics"].values():
        del metrics["operating_points"], metrics["unresolved"]
    summary["reviewer"] = {"ticket": 7}


def test_report_rerenders_an_older_summary_and_keeps_what_it_did_not_write(full_audit, tmp_path):
    before = json.loads((full_audit / "summary.json").read_text())
    out = copy_with_summary(full_audit, tmp_path, older)
    assert main(["report", str(out)]) == 0
    after = json.loads((out / "summary.json").read_text())
    assert after["reviewer"] == {"ticket": 7} and "host" not in after and "timings" not in after
    assert after["metrics"] == before["metrics"] and after["verdict"] == before["verdict"]


def test_report_refuses_a_summary_with_broken_metadata_in_one_line(full_audit, tmp_path, capsys):
    out = copy_with_summary(full_audit, tmp_path, lambda s: s.update(models="gpt2"))
    written = (out / "summary.json").read_text()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ezmia: error: {out}/summary.json: not a valid summary (models: ")
    assert err.count("\n") == 1 and (out / "summary.json").read_text() == written


def test_report_rewrites_nothing_it_did_not_write(full_audit, tmp_path, capsys):
    """A report.html the manifest does not list (an edited manifest, or one the operator put
    there) is not ezmia's to replace, and neither is a location holding other files."""
    out = tmp_path / "copy"
    shutil.copytree(full_audit, out)
    manifest = json.loads((out / "_ezmia_manifest.json").read_text())
    manifest["files"].remove("report.html")
    (out / "_ezmia_manifest.json").write_text(json.dumps(manifest))
    (out / "report.html").write_text("the operator's own page")
    summary = (out / "summary.json").read_text()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"ezmia: error: {out}/report.html: not a file this audit wrote (its "
        "_ezmia_manifest.json does not list it; 1 such), and ezmia report rewrites only an "
        "audit's own files: move it elsewhere, or rerun the audit into a new --out\n"
    )
    assert (out / "report.html").read_text() == "the operator's own page"
    assert (out / "summary.json").read_text() == summary


def test_missing_text_column_is_a_one_line_error_and_no_output(models, tmp_path, capsys):
    out = tmp_path / "bad"
    assert run_audit(models, out, "--text-column", "body") == 2
    err = capsys.readouterr().err
    assert "no column 'body'" in err and str(models.eval) in err
    assert not out.exists()


def test_python_dash_m_ezmia_shows_help():
    done = subprocess.run(
        [sys.executable, "-m", "ezmia", "audit", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--target" in done.stdout and "--label-column" in done.stdout


def test_s3_data_and_output(models, s3, bucket, tmp_path):
    client = s3.client()
    client.upload_file(str(models.eval), bucket, "data/eval.parquet")
    target = upload_dir(client, models.full, bucket, "models/full")
    out = f"s3://{bucket}/audits/full"
    code = main(
        [
            "audit",
            "--target",
            target,
            "--reference",
            str(models.base),
            "--data",
            f"s3://{bucket}/data/",
            "--label-column",
            "is_member",
            "--id-column",
            "id",
            "--out",
            out,
            "--max-length",
            "64",
            "--bootstrap-rounds",
            "10",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="audits/")["Contents"]]
    assert "audits/full/_SUCCESS" in keys and "audits/full/summary.json" in keys
    local = tmp_path / "local"
    assert run_audit(models, local) == 0
    remote = pq.read_table(f"{out}/scores/".replace("s3://", ""), filesystem=_fs()).sort_by("id")
    here = pq.read_table(local / "scores").sort_by("id")
    np.testing.assert_allclose(remote.column("ez_score"), here.column("ez_score"), rtol=1e-6)


def _fs():
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri("s3://x")[0]


def audit_config(argv: list[str]):
    from ezmia.cli import audit_config_from_args, build_parser

    return audit_config_from_args(build_parser().parse_args(argv))


def test_an_audit_collects_with_its_start_frozen_and_leaves_the_collector_as_it_was(
    models, tmp_path
):
    """Python's collector is paused while an audit starts (imports, model loading) and then
    runs with what the start left alive frozen; afterwards it is as it was, after a failed
    audit too. A collector the caller paused stays paused, and what it froze stays frozen."""
    from ezmia.audit import audit
    from ezmia.errors import EzmiaError

    frozen_when_collecting: list[int] = []

    def watch(phase: str, _info: dict) -> None:
        if phase == "start":
            frozen_when_collecting.append(gc.get_freeze_count())

    gc.callbacks.append(watch)
    try:
        audit(audit_config(audit_args(models, tmp_path / "ok")))
    finally:
        gc.callbacks.remove(watch)
    assert any(count > 0 for count in frozen_when_collecting)
    assert gc.isenabled() and gc.get_freeze_count() == 0

    with pytest.raises(EzmiaError):
        audit(audit_config(audit_args(models, tmp_path / "no", target=tmp_path / "missing")))
    assert gc.isenabled() and gc.get_freeze_count() == 0

    gc.disable()
    try:
        audit(audit_config(audit_args(models, tmp_path / "paused")))
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
    gc.freeze()
    try:
        audit(audit_config(audit_args(models, tmp_path / "frozen")))
        assert gc.isenabled() and gc.get_freeze_count() > 0  # not unfrozen by the audit
    finally:
        gc.unfreeze()
