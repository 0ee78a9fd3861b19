"""Planning S3 models without their weights (a Ray driver): small files and safetensors
headers only, the same checks and fingerprints as a full download; per-node downloads shared
by concurrent processes."""

from __future__ import annotations

import json
import threading

import pytest

from ezmia.errors import ModelError
from ezmia.plan.checks import check_adapter_fits
from ezmia.plan.fetch import resolve_tokenizer_dir
from ezmia.plan.models import plan_models
from tests.conftest import upload_dir


def test_a_plan_without_weights_checks_what_a_full_download_checks(models, s3, bucket, tmp_path):
    client = s3.client()
    base = upload_dir(client, models.base, bucket, "base")
    lora = upload_dir(client, models.lora, bucket, "lora")
    light = plan_models(lora, base, cache_dir=tmp_path / "light", weights=False)
    assert not list((tmp_path / "light").rglob("*.safetensors"))
    full = plan_models(lora, base, cache_dir=tmp_path / "full")
    assert light.fingerprints == full.fingerprints and light.target_is_adapter
    check_adapter_fits(light.target, light.reference)  # from the headers alone
    tokenizer = resolve_tokenizer_dir(base, tmp_path / "tok")
    assert (tokenizer / "tokenizer.json").exists()
    assert not list(tokenizer.rglob("*.safetensors"))

    weights = next(p for p in models.full.iterdir() if p.suffix == ".safetensors")
    data = weights.read_bytes()
    client.put_object(Bucket=bucket, Key=f"cut/{weights.name}", Body=data[: len(data) // 2])
    for path in models.full.iterdir():
        if path.suffix != ".safetensors":
            client.upload_file(str(path), bucket, f"cut/{path.name}")
    with pytest.raises(ModelError, match="corrupt or truncated safetensors"):
        plan_models(f"s3://{bucket}/cut", base, cache_dir=tmp_path / "light", weights=False)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    client.put_object(
        Bucket=bucket, Key=f"cut/{weights.name}", Body=len(header).to_bytes(8, "little") + header
    )
    with pytest.raises(ModelError, match="its header describes"):
        plan_models(f"s3://{bucket}/cut", base, cache_dir=tmp_path / "light2", weights=False)


def test_a_planning_entry_without_the_weights_listing_is_fetched_again(
    models, s3, bucket, tmp_path
):
    """An older ezmia cached planning folders without the list of the weights they lack; such
    an entry must not read as a checkpoint without weights."""
    from ezmia.plan.fetch import HEADER_LISTING, resolve_model_dir

    uri = upload_dir(s3.client(), models.full, bucket, "full")
    planned = resolve_model_dir(uri, tmp_path, weights=False)
    (planned / HEADER_LISTING).unlink()
    assert resolve_model_dir(uri, tmp_path, weights=False) == planned
    assert (planned / HEADER_LISTING).exists()
    assert plan_models(uri, str(models.base), cache_dir=tmp_path, weights=False).target == planned


def test_concurrent_resolutions_on_one_machine_share_one_download(models, s3, bucket, tmp_path):
    from ezmia.plan.fetch import resolve_model_dir

    uri = upload_dir(s3.client(), models.base, bucket, "base")
    found: list = []
    threads = [
        threading.Thread(target=lambda: found.append(resolve_model_dir(uri, tmp_path)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found) == 4
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == [
        found[0].name
    ]
