"""A LoRA adapter must match its reference's modules and shapes exactly: one that does not is
refused before anything loads (peft itself only warns and drops the tensors it cannot place,
which would audit a different model)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from ezmia.cli import main
from ezmia.errors import ModelError
from ezmia.plan.checks import check_adapter_fits
from tests.conftest import audit_args

Tensors = dict


def rewritten_adapter(source: Path, folder: Path, change: Callable[[Tensors], Tensors]) -> Path:
    """A copy of the adapter at ``source`` whose tensors went through ``change``."""
    shutil.copytree(source, folder)
    weights = folder / "adapter_model.safetensors"
    save_file(change(load_file(weights)), weights)
    return folder


def renamed(old: str, new: str) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {k.replace(old, new): v for k, v in tensors.items()}


def test_the_trained_adapter_fits_its_base(models):
    check_adapter_fits(models.lora, models.base)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (renamed(".attn.c_attn.", ".attn.c_qkv."), "module transformer.h.0.attn.c_qkv has no "
         "weight matrix in the reference"),
        (renamed(".h.1.", ".h.7."), "module transformer.h.7.attn.c_attn has no weight matrix"),
        (lambda t: {k: v for k, v in t.items() if "mlp.c_proj.lora_B" not in k},
         "module transformer.h.0.mlp.c_proj has lora_A.weight but no lora_B.weight"),
        (lambda t: {**t, "base_model.model.transformer.ln_f.weight": t[next(iter(t))]},
         "tensor transformer.ln_f.weight is [16, 64] but [64] in the reference"),
    ],
    ids=["module-the-reference-lacks", "layer-the-reference-lacks", "lora-a-without-b",
         "saved-module-of-another-shape"],
)  # fmt: skip
def test_adapter_that_does_not_match_the_reference_is_refused_before_scoring(
    models, tmp_path, capsys, change, expected
):
    adapter = rewritten_adapter(models.lora, tmp_path / "adapter", change)
    with pytest.raises(ModelError, match="the adapter does not fit reference"):
        check_adapter_fits(adapter, models.base)
    out = tmp_path / "out"
    assert main(audit_args(models, out, target=adapter)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ezmia: error: ") and err.count("\n") == 1, err
    assert expected in err and err.rstrip().endswith("pass the base model it was trained on as "
                                                     "--reference"), err  # fmt: skip
    assert not list(out.rglob("*.parquet"))
