"""Model downloads from S3 are verified (listed sizes, single-part MD5 ETags) before they
are cached, and a cached copy whose files changed is downloaded again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ezmia.cli import main
from ezmia.data import storage
from ezmia.errors import ModelError
from ezmia.plan.fetch import COMPLETE, resolve_model_dir
from tests.conftest import audit_args, upload_dir


class TamperingClient:
    """An S3 client whose downloads of ``model.safetensors`` are altered by ``mutate``."""

    def __init__(self, client, mutate) -> None:
        self._client = client
        self._mutate = mutate

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def download_file(self, bucket: str, key: str, dest: str, **kwargs) -> None:
        self._client.download_file(bucket, key, dest, **kwargs)
        if key.endswith("model.safetensors"):
            self._mutate(Path(dest))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _tamper(monkeypatch, mutate) -> None:
    client = storage.s3_client()
    monkeypatch.setattr(storage, "s3_client", lambda: TamperingClient(client, mutate))


@pytest.fixture
def staged(models, s3, request) -> str:
    """The full fine-tune under a fresh bucket."""
    bucket = s3.make_bucket(f"safe-{request.node.name.replace('_', '-')[5:40].strip('-')}")
    return upload_dir(s3.client(), models.full, bucket, "models/full")


def test_download_is_verified_then_reused_from_the_cache(staged, models, tmp_path, monkeypatch):
    local = resolve_model_dir(staged, tmp_path)
    assert (local / COMPLETE).exists()
    for name in ("config.json", "model.safetensors"):
        assert (local / name).read_bytes() == (models.full / name).read_bytes()
    _tamper(monkeypatch, lambda path: pytest.fail("a cached model was downloaded again"))
    assert resolve_model_dir(staged, tmp_path) == local


def test_download_with_wrong_content_is_refused(staged, models, tmp_path, monkeypatch, capsys):
    _tamper(monkeypatch, _flip_a_byte)
    out = tmp_path / "out"
    code = main(
        [
            "audit",
            "--target",
            staged,
            "--reference",
            str(models.base),
            "--data",
            str(models.eval),
            "--label-column",
            "is_member",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("ezmia: error:") == 1 and "Traceback" not in err
    assert f"{staged}/model.safetensors: downloaded content has MD5" in err
    assert "the download is corrupt, retry" in err
    assert not out.exists()
    assert not [p for p in (tmp_path / "cache").rglob(COMPLETE)]  # nothing cached


def test_download_of_the_wrong_size_is_refused(staged, tmp_path, monkeypatch):
    _tamper(monkeypatch, _truncate)
    with pytest.raises(ModelError, match=r"model.safetensors: downloaded \d+ bytes, the listing"):
        resolve_model_dir(staged, tmp_path)
    assert not list(tmp_path.rglob("model.safetensors"))  # the partial download is gone


def test_a_tampered_cache_is_downloaded_again(staged, models, tmp_path):
    local = resolve_model_dir(staged, tmp_path)
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    assert resolve_model_dir(staged, tmp_path) == local
    assert weights.read_bytes() == (models.full / "model.safetensors").read_bytes()


def test_kms_encrypted_objects_are_checked_by_size_only(models, s3, tmp_path, monkeypatch):
    """SSE-KMS ETags are not MD5s of the content, so only their sizes can be checked."""
    bucket = s3.make_bucket("safe-kms")
    client = s3.client()
    for path in sorted(models.full.iterdir()):
        extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/ezmia"}
        client.upload_file(str(path), bucket, f"m/{path.name}", ExtraArgs=extra)
    _tamper(monkeypatch, _flip_a_byte)
    assert (resolve_model_dir(f"s3://{bucket}/m", tmp_path) / COMPLETE).exists()


def _pickle_beside_safetensors(models, root: Path, case: str) -> Path:
    """A checkpoint that holds safetensors weights, yet whose loader would read pickle ones:
    an adapter whose safetensors file is not ``adapter_model.safetensors`` beside an
    ``adapter_model.bin`` (peft reads that one), a sharded checkpoint whose index names a
    ``.bin`` shard, or a tokenizer whose ``tokenizer_class`` is a model class (AutoTokenizer
    then loads the model, from ``pytorch_model.bin`` when there is no model.safetensors)."""
    import torch
    from safetensors.torch import load_file

    folder = root / case
    if case == "adapter":
        shutil.copytree(models.lora, folder)
        (folder / "adapter_model.safetensors").rename(folder / "weights.safetensors")
        torch.save(load_file(folder / "weights.safetensors"), folder / "adapter_model.bin")
        return folder
    shutil.copytree(models.full, folder)
    weights = load_file(folder / "model.safetensors")
    if case == "index":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        first = sorted(weights)[0]
        torch.save({first: weights[first]}, folder / "shard.bin")
        shards = dict.fromkeys(weights, "model-00001-of-00001.safetensors") | {first: "shard.bin"}
        index = {"metadata": {}, "weight_map": shards}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (folder / "model.safetensors").rename(folder / "weights.safetensors")
        torch.save(weights, folder / "pytorch_model.bin")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "GPT2LMHeadModel"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("case", "named", "says"),
    [
        ("adapter", "", "no adapter_model.safetensors, only pickle-based weights (.bin/.pt)"),
        ("index", "model.safetensors.index.json", "weight_map names the shard 'shard.bin'"),
        ("tokenizer", "tokenizer_config.json", "tokenizer_class 'GPT2LMHeadModel' is not a"),
    ],
)
def test_pickle_weights_beside_safetensors_are_refused_before_anything_loads(
    models, tmp_path, monkeypatch, capsys, case, named, says
):
    import torch

    target = _pickle_beside_safetensors(models, tmp_path, case)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail(f"torch.load{a}"))
    out = tmp_path / "out"
    code = main(audit_args(models, out, "--cache-dir", str(tmp_path / "cache"), target=target))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("ezmia: error:") == 1 and "Traceback" not in err
    assert f"{target / named}: {says}" in err
    assert "--allow-pickle" in err or "set it to the tokenizer's class" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("fields", "kernel"),
    [
        ({"attn_implementation": "sdpa"}, None),
        ({"experts_implementation": "kernels-community/moe"}, "kernels-community/moe"),
        ({"text_config": {"attn_implementation": {"": "eager", "vision": "org/k"}}}, "org/k"),
        ({"sub_configs": [{"_attn_implementation": "org/attn"}]}, "org/attn"),
    ],
)
def test_a_hub_kernel_named_anywhere_in_the_config_needs_trust_remote_code(
    models, tmp_path, fields, kernel
):
    from ezmia.plan.checks import check_checkpoint

    folder = shutil.copytree(models.full, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text()) | fields
    (folder / "config.json").write_text(json.dumps(config))
    assert not check_checkpoint(folder, allow_pickle=False, trust_remote_code=True)
    if kernel is None:
        assert not check_checkpoint(folder, allow_pickle=False, trust_remote_code=False)
        return
    with pytest.raises(ModelError, match=f"asks for the hub kernel '{kernel}'"):
        check_checkpoint(folder, allow_pickle=False, trust_remote_code=False)


def test_a_tokenizer_that_ships_its_own_code_is_refused(models, tmp_path):
    from ezmia.plan.checks import check_checkpoint

    folder = shutil.copytree(models.full, tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"tokenizer_config.json: the tokenizer ships its own"):
        check_checkpoint(folder, allow_pickle=False, trust_remote_code=True)
