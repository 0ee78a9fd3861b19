"""A catalogue of bad inputs: each is refused with exit code 2 and one plain line on stderr
that names the file, column, row or flag at fault and says how to fix it, and leaves no
output behind (a finished report stays byte-for-byte as it was). Per-row problems never
stop a run: those rows get an explicit ``ez_status``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.cli import main
from ezmia.data import storage
from ezmia.data.text import load_tokenizer
from tests.infra import free_port

MAX_LENGTH = "32"


@dataclass(frozen=True)
class Kit:
    """The demo models plus a folder of bad datasets, configs and checkpoints."""

    models: object
    root: Path

    def __getattr__(self, name: str) -> str:
        """``kit.small`` is ``ROOT/small.parquet`` if that exists, else ``ROOT/small``."""
        parquet = self.root / f"{name}.parquet"
        return str(parquet if parquet.exists() else self.root / name)

    def __getitem__(self, name: str) -> str:
        return str(self.root / name)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _build_bad_models(models, root: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer_files = [p for p in models.base.iterdir() if p.name.startswith(("tokenizer", "spec"))]
    (root / "noweights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models.base / name, root / "noweights" / name)
    (root / "notckpt").mkdir()
    shutil.copy(models.base / "tokenizer.json", root / "notckpt" / "tokenizer.json")
    weights = _copy_model(models.full, root / "truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickle = _copy_model(models.full, root / "pickle")
    (pickle / "model.safetensors").unlink()
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _edit_json(
        _copy_model(models.full, root / "automap") / "config.json",
        auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"},
    )
    _edit_json(
        _copy_model(models.full, root / "hubkernel") / "config.json",
        attn_implementation="kernels-community/flash-attn",
    )
    _edit_json(_copy_model(models.base, root / "othervocab") / "config.json", vocab_size=2048)
    tokenizer = _copy_model(models.base, root / "othertok") / "tokenizer.json"
    data = json.loads(tokenizer.read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer.write_text(json.dumps(data))
    config = GPT2Config.from_pretrained(models.base)
    config.n_embd *= 2
    GPT2LMHeadModel(config).save_pretrained(root / "wide")
    for file in tokenizer_files:
        shutil.copy(file, root / "wide" / file.name)
    _edit_json(
        _copy_model(models.lora, root / "lora_lost_base") / "adapter_config.json",
        base_model_name_or_path=str(root / "no-such-base"),
    )


def _build_bad_data(models, root: Path) -> None:
    table = pq.read_table(models.eval)
    members = table.filter(table.column("is_member")).slice(0, 4)
    nonmembers = table.filter(pa.compute.invert(table.column("is_member"))).slice(0, 4)
    small = pa.concat_tables([members, nonmembers])
    pq.write_table(small, root / "small.parquet")
    pq.write_table(small.select(["id", "text"]).slice(0, 4), root / "members.parquet")
    pq.write_table(small.select(["id", "text"]).slice(4), root / "nonmembers.parquet")
    pq.write_table(small.select(["id", "text"]).slice(0, 0), root / "no_rows.parquet")
    pq.write_table(small.slice(0, 0), root / "empty.parquet")
    pq.write_table(
        pa.table({"text": [1, 2], "is_member": [True, False]}), root / "text_int.parquet"
    )
    pq.write_table(
        small.set_column(2, "is_member", pa.array(["yes"] * 8)), root / "label_str.parquet"
    )
    values = pa.array([1, 0, 1, 0, 1, 0, 7, 0])  # written in two row groups: row 6 is in the second
    pq.write_table(
        small.set_column(2, "is_member", values), root / "label_7.parquet", row_group_size=4
    )
    nulls = pa.array([True, False, None, False, True, False, True, False])
    pq.write_table(small.set_column(2, "is_member", nulls), root / "label_null.parquet")
    pq.write_table(
        small.set_column(2, "is_member", pa.array([True] * 8)), root / "one_class.parquet"
    )
    ids = pa.array(["a", "b", "c", "b", "e", "f", "g", "h"])
    pq.write_table(small.set_column(0, "id", ids), root / "dup_ids.parquet")
    ids = pa.array(["a", "b", "c", "d", None, "f", "g", "h"])
    pq.write_table(small.set_column(0, "id", ids), root / "null_ids.parquet")
    pq.write_table(small.set_column(0, "id", pa.array(range(8))), root / "int_ids.parquet")
    (root / "corrupt.parquet").write_bytes(b"this is not a parquet file\n" * 20)
    raw = (root / "small.parquet").read_bytes()
    (root / "truncated.parquet").write_bytes(raw[: len(raw) // 2])
    (root / "csv_only").mkdir()
    (root / "csv_only" / "data.csv").write_text("id,text\n1,hello\n")


def _build_configs(models, root: Path) -> None:
    base = (
        f"target: {models.full}\nreference: {models.base}\nout: {root / 'cfg-out'}\n"
        f"data: [{root / 'small.parquet'}]\nlabel_column: is_member\n"
    )
    (root / "typo.yaml").write_text(base + "max_lenght: 32\n")
    (root / "nested_typo.yaml").write_text(base + "ray:\n  min_actor: 2\n")
    (root / "broken.yaml").write_text("target: [unclosed\n")
    (root / "list.yaml").write_text("- target: x\n")
    (root / "config_dir.yaml").mkdir()


@pytest.fixture(scope="module")
def kit(models, tmp_path_factory) -> Kit:
    root = tmp_path_factory.mktemp("bad")
    _build_bad_data(models, root)
    _build_bad_models(models, root)
    _build_configs(models, root)
    return Kit(models, root)


@pytest.fixture(scope="module")
def finished(kit, tmp_path_factory) -> Path:
    """A finished report, to show it is refused and left untouched."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(["audit", *_audit(kit), "--out", str(out)]) == 0
    return out


def _audit(kit: Kit, *extra: str, target=None, reference="base", data=None) -> list[str]:
    """Audit flags over the small labelled dataset, with overrides."""
    args = ["--target", str(target or kit.models.full)]
    if reference:
        args += ["--reference", str(getattr(kit.models, reference, reference))]
    if data is None:
        args += ["--data", kit.small, "--id-column", "id", "--label-column", "is_member"]
    else:
        args += data
    return [*args, "--max-length", MAX_LENGTH, "--bootstrap-rounds", "0", *extra]


def _labelled(path: str) -> list[str]:
    return ["--data", path, "--id-column", "id", "--label-column", "is_member"]


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Kit], list[str]]
    expected: tuple[str, ...]
    """Fragments of the error line; ``{root}`` is the folder of bad inputs."""


CASES = [
    # --- datasets: columns and types
    Case("missing-text-column", lambda k: _audit(k, "--text-column", "body"),
         ("{root}/small.parquet", "no column 'body'", "columns: id, text, is_member",
          "--text-column")),
    Case("missing-id-column", lambda k: _audit(k, data=["--data", k.small, "--id-column", "key"]),
         ("{root}/small.parquet", "no column 'key'", "--id-column")),
    Case("missing-label-column",
         lambda k: _audit(k, data=["--data", k.small, "--label-column", "member"]),
         ("{root}/small.parquet", "no column 'member'", "--label-column")),
    Case("text-column-not-string",
         lambda k: _audit(k, data=["--data", k.text_int, "--label-column", "is_member"]),
         ("{root}/text_int.parquet", "text column 'text' has type int64, expected string")),
    Case("labels-not-boolean", lambda k: _audit(k, data=_labelled(k.label_str)),
         ("{root}/label_str.parquet", "label column 'is_member' has type string",
          "expected bool or 0/1")),
    Case("labels-not-0-or-1", lambda k: _audit(k, data=_labelled(k.label_7)),
         ("{root}/label_7.parquet", "label column 'is_member' has value 7 at row 6",
          "expected bool or 0/1")),
    Case("labels-null", lambda k: _audit(k, data=_labelled(k.label_null)),
         ("{root}/label_null.parquet", "label column 'is_member' is null at row 2",
          "set every label")),
    Case("labelled-audit-with-one-class", lambda k: _audit(k, data=_labelled(k.one_class)),
         ("{root}/one_class.parquet", "every row is one class (only members)",
          "needs both members and non-members")),
    Case("members-with-empty-nonmembers",
         lambda k: _audit(k, data=["--members", k.members, "--nonmembers", k.no_rows]),
         ("{root}/members.parquet", "only members")),
    Case("duplicate-ids", lambda k: _audit(k, data=_labelled(k.dup_ids)),
         ("{root}/dup_ids.parquet row 1", "id column 'id' has duplicates", "'b' appears 2 times",
          "again at {root}/dup_ids.parquet row 3", "ids must be unique")),
    Case("duplicate-ids-across-files",
         lambda k: _audit(k, data=[*_labelled(k.small), "--data", k.small]),
         ("{root}/small.parquet row 0", "has duplicates", "appears 2 times", "ids must be unique")),
    Case("null-ids", lambda k: _audit(k, data=_labelled(k.null_ids)),
         ("{root}/null_ids.parquet row 4", "id column 'id' is null", "drop --id-column")),
    Case("id-types-differ-between-files",
         lambda k: _audit(k, data=[*_labelled(k.small), "--data", k.int_ids]),
         ("{root}/int_ids.parquet", "id column 'id' has type int64",
          "but {root}/small.parquet has string", "same id type")),
    Case("empty-dataset", lambda k: _audit(k, data=_labelled(k.empty)),
         ("{root}/empty.parquet", "the dataset has no rows")),
    Case("empty-calibration-set",
         lambda k: _audit(k, data=["--data", k.members, "--calibration", k.no_rows]),
         ("{root}/no_rows.parquet", "0 known non-members cannot calibrate --fpr 0.001",
          "add calibration rows")),
    Case("calibration-set-too-small-for-the-fpr",
         lambda k: _audit(k, data=["--data", k.members, "--calibration", k.nonmembers]),
         ("--calibration", "cannot calibrate --fpr 0.001, which needs at least 1000",
          "raise --fpr")),
    # --- datasets: files
    Case("corrupt-parquet", lambda k: _audit(k, data=["--data", k.corrupt]),
         ("{root}/corrupt.parquet", "not a readable Parquet file", "re-export it")),
    Case("truncated-parquet", lambda k: _audit(k, data=["--data", k.truncated]),
         ("{root}/truncated.parquet", "not a readable Parquet file", "re-export it")),
    Case("directory-without-parquet", lambda k: _audit(k, data=["--data", k.csv_only]),
         ("{root}/csv_only", "no Parquet files found", "found e.g. {root}/csv_only/data.csv")),
    Case("dataset-path-missing", lambda k: _audit(k, data=["--data", k.nothing_here]),
         ("{root}/nothing_here", "no such file, directory or prefix")),
    # --- checkpoints
    Case("model-folder-without-weights", lambda k: _audit(k, target=k.noweights),
         ("{root}/noweights", "no weights found (expected *.safetensors)")),
    Case("model-folder-not-a-checkpoint", lambda k: _audit(k, target=k.notckpt),
         ("{root}/notckpt", "neither config.json nor adapter_config.json")),
    Case("model-path-missing", lambda k: _audit(k, target=k.no_model),
         ("{root}/no_model", "model path is not a directory")),
    Case("truncated-safetensors", lambda k: _audit(k, target=k.truncated_weights),
         ("{root}/truncated_weights/model.safetensors", "corrupt or truncated safetensors",
          "download or save the checkpoint again")),
    Case("pickle-only-checkpoint", lambda k: _audit(k, target=k.pickle),
         ("{root}/pickle", "only pickle-based weights", "--allow-pickle")),
    Case("custom-code-without-trust-remote-code", lambda k: _audit(k, target=k.automap),
         ("{root}/automap/config.json", "auto_map", "--trust-remote-code")),
    Case("hub-kernel-without-trust-remote-code", lambda k: _audit(k, target=k.hubkernel),
         ("{root}/hubkernel/config.json", "hub kernel 'kernels-community/flash-attn'",
          "--trust-remote-code")),
    Case("different-vocabularies", lambda k: _audit(k, reference=k.othervocab),
         ("{root}/othervocab has 2048", "must share a tokenizer")),
    Case("different-tokenizers", lambda k: _audit(k, reference=k.othertok),
         ("the tokenizers of target", "and reference {root}/othertok differ")),
    Case("adapter-on-a-base-of-other-width",
         lambda k: _audit(k, target=k.models.lora, reference=k.wide),
         ("the adapter does not fit reference {root}/wide", "64x192 in the adapter but 128x384",
          "pass the base model it was trained on as --reference")),
    Case("adapter-whose-base-is-missing",
         lambda k: _audit(k, target=k.lora_lost_base, reference=None),
         ("{root}/lora_lost_base", "the adapter's base {root}/no-such-base", "pass --reference")),
    Case("full-checkpoint-without-reference", lambda k: _audit(k, reference=None),
         ("needs --reference",)),
    Case("reference-is-an-adapter", lambda k: _audit(k, reference="lora"),
         ("the reference must be a full checkpoint",)),
    Case("max-length-above-context", lambda k: [*_audit(k), "--max-length", "4096"],
         ("--max-length 4096 exceeds the model's context of 128 tokens",
          "use --max-length 128 or less")),
    # --- flags and configs
    Case("max-length-below-two", lambda k: [*_audit(k), "--max-length", "1"],
         ("--max-length", "greater than or equal to 2", "got '1'")),
    Case("members-without-nonmembers", lambda k: _audit(k, data=["--members", k.members]),
         ("--members and --nonmembers go together",)),
    Case("calibration-with-labels", lambda k: _audit(k, "--calibration", k.nonmembers),
         ("--calibration is for unlabelled --data", "drop one")),
    Case("batch-size-zero", lambda k: _audit(k, "--batch-size", "0"),
         ("batch_size (--batch-size)", "greater than or equal to 1", "got '0'")),
    Case("batch-size-negative", lambda k: _audit(k, "--batch-size", "-3"),
         ("--batch-size", "got '-3'")),
    Case("fpr-zero", lambda k: _audit(k, "--fpr", "0"), ("fpr (--fpr)", "greater than 0")),
    Case("fpr-above-one", lambda k: _audit(k, "--fpr", "1.5"),
         ("fpr (--fpr)", "less than 1", "got '1.5'")),
    Case("kms-key-without-sse", lambda k: _audit(k, "--sse-kms-key-id", "alias/x"),
         ("--sse-kms-key-id needs --sse aws:kms",)),
    Case("ray-max-actors-below-min",
         lambda k: _audit(k, "--ray-min-actors", "3", "--ray-max-actors", "1"),
         ("--ray-max-actors 1 is below --ray-min-actors 3",)),
    Case("config-unknown-key", lambda k: ["--config", k["typo.yaml"]],
         ("{root}/typo.yaml", "max_lenght: unknown key", "did you mean 'max_length'?")),
    Case("config-unknown-nested-key", lambda k: ["--config", k["nested_typo.yaml"]],
         ("{root}/nested_typo.yaml", "ray.min_actor: unknown key", "did you mean 'min_actors'?")),
    Case("config-not-yaml", lambda k: ["--config", k["broken.yaml"]],
         ("{root}/broken.yaml", "unreadable config")),
    Case("config-not-a-mapping", lambda k: ["--config", k["list.yaml"]],
         ("{root}/list.yaml", "expected a YAML mapping")),
    Case("config-is-a-directory", lambda k: ["--config", k["config_dir.yaml"]],
         ("{root}/config_dir.yaml", "unreadable config", "Is a directory")),
    Case("config-missing", lambda k: ["--config", k["nope.yaml"]],
         ("{root}/nope.yaml", "config file not found")),
    Case("output-is-a-file", lambda k: _audit(k, "--out", k.small),
         ("{root}/small.parquet", "is a file", "choose another --out")),
    # --- datasets: members and non-members kept apart, ids that cannot leak texts
    Case("same-file-as-members-and-nonmembers",
         lambda k: _audit(k, data=["--members", k.members, "--nonmembers", k.members]),
         ("{root}/members.parquet: given as both --members ({root}/members.parquet) and "
          "--nonmembers ({root}/members.parquet)", "give each file to one side only")),
    Case("same-id-member-and-nonmember",
         lambda k: _audit(k, data=["--members", k.members, "--nonmembers", k.small,
                                   "--id-column", "id"]),
         ("{root}/members.parquet row 0 (member) and {root}/small.parquet row 0 (non-member) "
          "have the same id", "remove it from one side, or fix its label")),
    Case("same-text-member-and-nonmember",
         lambda k: _audit(k, data=["--members", k.members, "--nonmembers", k.small]),
         ("{root}/members.parquet row 0 (member) and {root}/small.parquet row 0 (non-member) "
          "hold the same text", "remove it from one side, or fix its label")),
    Case("id-column-is-the-text-column",
         lambda k: _audit(k, data=["--data", k.small, "--id-column", "text",
                                   "--label-column", "is_member"]),
         ("--id-column 'text' is also the text column", "texts are private")),
]  # fmt: skip

# --- where the audit runs: this machine's devices, Ray addresses and actor requests (no cluster
# is started: each is refused before one would be joined)


def _past_the_last_gpu() -> str:
    """``cuda:N`` for N the number of GPUs here: never a device of this machine."""
    import torch

    return f"cuda:{torch.cuda.device_count()}"


CASES += [
    Case("device-past-the-last-gpu", lambda k: _audit(k, "--device", _past_the_last_gpu()),
         ("--device cuda:", ": this machine has", "--device")),
    Case("device-unknown", lambda k: _audit(k, "--device", "gpu"),
         ("--device 'gpu': not a device torch knows", "use auto, cpu, cuda, cuda:N or mps")),
    Case("ray-address-is-a-job-server",
         lambda k: _audit(k, "--ray-address", "http://127.0.0.1:8265"),
         ("--ray-address http://127.0.0.1:8265: this is a Ray job server's address",
          "--ray-address HOST:6379", "ray job submit")),
    Case("ray-address-nothing-answers",
         lambda k: _audit(k, "--ray-address", f"127.0.0.1:{free_port()}"),
         ("--ray-address 127.0.0.1:", "no Ray cluster answers there", "start the cluster")),
    Case("ray-device-cuda-without-actor-gpus", lambda k: _audit(k, "--engine", "ray",
                                                                "--device", "cuda"),
         ("--device cuda: the scoring actors ask for no GPU", "--ray-gpus-per-actor 1")),
    Case("ray-gpus-neither-whole-nor-a-fraction",
         lambda k: _audit(k, "--engine", "ray", "--ray-gpus-per-actor", "1.5"),
         ("--ray-gpus-per-actor 1.5", "whole GPUs")),
]  # fmt: skip


def _refused(code: int, err: str, expected: tuple[str, ...], root: Path) -> str:
    """Exit 2, no traceback, exactly one ``ezmia: error:`` line holding every fragment."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ezmia:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("ezmia: error: ")
    for fragment in expected:
        assert fragment.format(root=root) in line, line
    return line


def _files(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_clear_line(case: Case, kit, tmp_path, capsys):
    out = tmp_path / "out"
    args = case.args(kit)
    if "--config" not in args and "--out" not in args:
        args += ["--out", str(out)]
    before = _files(kit.root)
    code = main(["audit", *args])
    _refused(code, capsys.readouterr().err, case.expected, kit.root)
    assert not out.exists()
    assert not (kit.root / "cfg-out").exists()
    assert _files(kit.root) == before  # inputs untouched, nothing written beside them


def test_finished_report_is_refused_and_left_untouched(kit, finished, capsys):
    before = _files(finished)
    assert "_SUCCESS" in before and "summary.json" in before
    code = main(["audit", *_audit(kit), "--out", str(finished)])
    expected = (f"{finished}: already holds a finished audit", "--overwrite", "another --out")
    _refused(code, capsys.readouterr().err, expected, kit.root)
    assert _files(finished) == before


# --- S3: missing objects and buckets, an unreachable endpoint, no credentials

NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}

S3_CASES = [
    ("missing-object", lambda b: {"data": f"s3://{b}/data/missing.parquet"}, {},
     ("s3://{bucket}/data/missing.parquet", "no such file, directory or prefix")),
    ("missing-bucket", lambda b: {"data": "s3://ezmia-no-such-bucket/data/"}, {},
     ("s3://ezmia-no-such-bucket/data/", "cannot list", "the bucket does not exist")),
    ("output-bucket-missing", lambda b: {"out": "s3://ezmia-no-such-bucket/audit"}, {},
     ("s3://ezmia-no-such-bucket/audit", "the bucket does not exist")),
    ("model-prefix-empty", lambda b: {"target": f"s3://{b}/models/none"}, {},
     ("s3://{bucket}/models/none", "no objects under this model prefix")),
    ("endpoint-unreachable", lambda b: {}, {"AWS_ENDPOINT_URL": "closed-port"},
     ("s3://{bucket}/data/", "could not connect to the S3 endpoint http://127.0.0.1:",
      "check AWS_ENDPOINT_URL")),
    ("no-credentials", lambda b: {}, NO_CREDENTIALS,
     ("s3://{bucket}/data/", "no AWS credentials found", "AWS_ACCESS_KEY_ID")),
    ("empty-credentials", lambda b: {}, {**NO_CREDENTIALS, "AWS_ACCESS_KEY_ID": "",
                                          "AWS_SECRET_ACCESS_KEY": ""},
     ("s3://{bucket}/data/", "no AWS credentials found")),
    ("no-credentials-for-the-model", lambda b: {"target": f"s3://{b}/models/full"}, NO_CREDENTIALS,
     ("s3://{bucket}/models/full", "cannot list the model prefix", "no AWS credentials found")),
]  # fmt: skip


@pytest.mark.parametrize("case", S3_CASES, ids=[c[0] for c in S3_CASES])
def test_s3_failure_is_refused_with_one_clear_line(case, kit, s3, tmp_path, monkeypatch, capsys):
    name, override, env, expected = case
    bucket = s3.make_bucket(f"bad-{name}")
    client = s3.client()
    client.upload_file(kit.small, bucket, "data/small.parquet")
    client.upload_file(str(kit.models.full / "config.json"), bucket, "models/full/config.json")
    values = {"data": f"s3://{bucket}/data/", "out": f"s3://{bucket}/audit", **override(bucket)}
    for variable, value in env.items():
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            value = f"http://127.0.0.1:{free_port()}" if value == "closed-port" else value
            monkeypatch.setenv(variable, value)
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    storage.s3_client.cache_clear()
    args = _audit(
        kit,
        "--cache-dir",
        str(tmp_path / "cache"),
        target=values.get("target"),
        data=["--data", values["data"], "--label-column", "is_member"],
    )
    try:
        code = main(["audit", *args, "--out", values["out"]])
    finally:
        storage.s3_client.cache_clear()
    _refused(
        code,
        capsys.readouterr().err,
        tuple(e.replace("{bucket}", bucket) for e in expected),
        kit.root,
    )
    listed = client.list_objects_v2(Bucket=bucket, Prefix="audit")
    assert listed["KeyCount"] == 0


# --- rows that are bad one by one never stop a run


def test_bad_rows_get_a_status_and_are_counted(kit, tmp_path):
    tokenizer = load_tokenizer(kit.models.base)
    one_token = next(
        w
        for w in ("the", "a", "x", "e")
        if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1
    )
    good = pq.read_table(kit.small)
    rows = [
        (f"good-{i}", t.encode(), m)
        for i, (t, m) in enumerate(
            zip(good.column("text").to_pylist(), good.column("is_member").to_pylist(), strict=True)
        )
    ]
    odd = {
        "null": (None, "empty"),
        "empty": (b"", "empty"),
        "whitespace": (b"  \n\t  ", "empty"),
        "one-token": (one_token.encode(), "too_short"),
        "undecodable": (b"\xff\xfe caf\xe9 \x80", "empty"),
        "long": (("All work and no play makes Jack a dull boy. " * 2300)[:100_000].encode(), None),
    }
    rows += [(name, text, i % 2 == 0) for i, (name, (text, _)) in enumerate(odd.items())]
    data = tmp_path / "odd.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [r[0] for r in rows],
                "text": pa.array([r[1] for r in rows], pa.binary()),
                "is_member": [r[2] for r in rows],
            }
        ),
        data,
    )
    out = tmp_path / "out"
    assert main(["audit", *_audit(kit, data=_labelled(str(data))), "--out", str(out)]) == 0
    scores = {r["id"]: r for r in pq.read_table(out / "scores").to_pylist()}
    assert len(scores) == len(rows)
    for name, (_, status) in odd.items():
        if status:
            assert scores[name]["ez_status"] == status, name
            assert scores[name]["ez_score"] == 0.0
    assert scores["undecodable"]["text_sha256"] is None and scores["null"]["text_sha256"] is None
    long = scores["long"]
    assert long["truncated"] and long["n_tokens"] == int(MAX_LENGTH)
    assert long["ez_status"] not in ("empty", "too_short")
    summary = json.loads((out / "summary.json").read_text())
    counted = {}
    for row in scores.values():
        counted[row["ez_status"]] = counted.get(row["ez_status"], 0) + 1
    assert {k: v for k, v in summary["status_counts"].items() if v} == counted
    assert summary["status_counts"]["empty"] == 4
    assert (out / "_SUCCESS").exists()
