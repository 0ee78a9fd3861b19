"""Model planning: fingerprints come from what storage already knows, and a local weight
file is hashed once per path, size and modification time."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pytest

from ezmia.data import text
from ezmia.errors import ModelError
from ezmia.plan.fetch import resolve_model_dir
from ezmia.plan.models import fingerprint, plan_models
from tests.conftest import upload_dir


def test_a_local_fingerprint_is_the_content_hash_and_is_cached(models, tmp_path):
    model = shutil.copytree(models.base, tmp_path / "model")
    cache = tmp_path / "cache"
    first = fingerprint(model, cache)
    entries = sorted((cache / "fingerprints").iterdir())
    weights = model / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in {e.read_text() for e in entries}
    assert fingerprint(model, cache) == first
    assert sorted((cache / "fingerprints").iterdir()) == entries  # nothing hashed again


def test_changed_weights_change_the_fingerprint(models, tmp_path):
    model = shutil.copytree(models.base, tmp_path / "model")
    cache = tmp_path / "cache"
    before = fingerprint(model, cache)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint(model, cache) != before


def test_an_s3_model_is_fingerprinted_by_its_listing(models, s3, bucket, tmp_path):
    client = s3.client()
    uri = upload_dir(client, models.base, bucket, "base")
    local = resolve_model_dir(uri, tmp_path / "cache")
    first = fingerprint(local, tmp_path / "cache")
    assert not (tmp_path / "cache" / "fingerprints").exists()  # no weight file was read
    client.put_object(Bucket=bucket, Key="base/config.json", Body=b'{"changed": true}')
    again = resolve_model_dir(uri, tmp_path / "cache")
    assert fingerprint(again, tmp_path / "cache") != first


@pytest.mark.parametrize("escape", ["absolute", "parent"])
def test_an_s3_key_leading_out_of_the_model_folder_is_refused_and_nothing_is_written(
    models, s3, bucket, tmp_path, escape
):
    """An object key is a path ezmia would write under its cache: ``prefix//abs`` or one with
    ``..`` would land anywhere on the machine. Such a key refuses the model before any
    download."""
    client = s3.client()
    uri = upload_dir(client, models.base, bucket, "base")
    landing = tmp_path / "landing.txt"
    cache = tmp_path / "cache" / "deep"  # the staging folder is cache/models/.<key>.partial-*
    rel = f"/{landing}".replace("//", "/") if escape == "absolute" else "../../../../landing.txt"
    client.put_object(Bucket=bucket, Key=f"base/{rel}", Body=b"planted")
    with pytest.raises(ModelError, match=r"leads out of the model folder"):
        resolve_model_dir(uri, cache)
    assert not landing.exists()
    assert not [path for path in cache.rglob("*") if path.is_file()]  # nothing downloaded


def test_identical_tokenizer_files_pair_without_loading_and_rewritten_ones_are_compared(
    models, tmp_path
):
    """Byte-identical tokenizer files are the same tokenizer: planning loads neither. The
    same vocabulary written differently is loaded, compared and accepted."""
    reference = tmp_path / "reference"
    shutil.copytree(models.base, reference)
    text._loaded_tokenizer.cache_clear()
    plan_models(str(models.full), str(reference), cache_dir=tmp_path / "cache")
    assert text._loaded_tokenizer.cache_info().currsize == 0

    tokenizer = reference / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    plan_models(str(models.full), str(reference), cache_dir=tmp_path / "cache")
    assert text._loaded_tokenizer.cache_info().currsize == 2


def test_a_merge_that_fails_leaves_nothing_in_the_cache(models, tmp_path):
    """The merged copy is staged in a folder of its own; when saving it fails (here a tokenizer
    file that is a folder and cannot be copied), that folder goes too."""
    from ezmia.plan.models import merged_adapter_dir

    plan = plan_models(str(models.lora), None, cache_dir=tmp_path / "cache")
    broken = tmp_path / "tokenizer"
    (broken / "tokenizer.json").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        merged_adapter_dir(dataclasses.replace(plan, tokenizer=broken), tmp_path / "cache")
    assert list((tmp_path / "cache" / "merged").iterdir()) == []


def test_a_planning_download_that_fails_leaves_nothing_in_the_cache(s3, bucket, tmp_path):
    """A safetensors header that cannot be read fails the planning download after its small
    files are in: the staging folder goes with them."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}")
    uri = upload_dir(s3.client(), model, bucket, "truncated")
    with pytest.raises(ModelError, match="corrupt or truncated safetensors file"):
        resolve_model_dir(uri, tmp_path / "cache", weights=False)
    plans = tmp_path / "cache" / "plans"
    assert [p.name for p in plans.iterdir() if not p.name.endswith(".lock")] == []


def test_links_planted_in_the_model_cache_are_never_written_through(models, s3, bucket, tmp_path):
    """A download and a merge are staged in a folder of their own, never in whatever already
    sits at a predictable name (a link to another folder would be written through, replacing
    its files), and a cache lock is never opened through a link (which would create the file
    it points at)."""
    import threading

    from ezmia.plan.models import merged_adapter_dir

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("not ezmia's")
    uri = upload_dir(s3.client(), models.full, bucket, "full")
    key = resolve_model_dir(uri, tmp_path / "learn").name
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / f".{key}.partial-{os.getpid()}-{threading.get_ident()}").symlink_to(victim)
    plan = plan_models(str(models.lora), None, cache_dir=cache)
    merged = merged_adapter_dir(plan, tmp_path / "learn").name
    (cache / "merged").mkdir()
    (cache / "merged" / f".{merged}.partial-{os.getpid()}").symlink_to(victim)
    downloaded = resolve_model_dir(uri, cache)
    assert (downloaded / "config.json").read_bytes() == (models.full / "config.json").read_bytes()
    assert (merged_adapter_dir(plan, cache) / "model.safetensors").is_file()
    assert [p.name for p in victim.iterdir()] == ["config.json"]
    assert (victim / "config.json").read_text() == "not ezmia's"
    elsewhere = tmp_path / "created-through-a-link"
    (tmp_path / "locked" / "models").mkdir(parents=True)
    (tmp_path / "locked" / "models" / f".{key}.lock").symlink_to(elsewhere)
    with pytest.raises(ModelError, match=r"\.lock: cannot open this model cache lock"):
        resolve_model_dir(uri, tmp_path / "locked")
    assert not elsewhere.exists()
