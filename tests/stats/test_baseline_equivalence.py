"""The fast PyTorch path equals the reference code's scoring path (benchmarks/baseline.py) on a
tiny random GPT-2, for a full fine-tune and for a LoRA adapter sharing its base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import baseline
from ezmia.backends.torch import (
    TorchBackend,
    _inplace_moments,
    _pure_moments,
    tiled_head_statistics,
)
from ezmia.data.text import load_tokenizer, tokenize
from ezmia.demo.corpus import collect_docstrings
from ezmia.demo.train import save_checkpoint, set_adapter_base, train_tokenizer
from ezmia.plan.models import plan_models
from ezmia.stats.scores import score_sequence

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tokenizer, random base, perturbed full fine-tune and random LoRA adapter."""
    root = tmp_path_factory.mktemp("tiny-gpt2")
    tok = train_tokenizer(collect_docstrings()[:300], 512, root / "tokenizer")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(config).eval()
    save_checkpoint(base, tok, root / "base")
    lora = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
    adapted = get_peft_model(base, lora)
    save_checkpoint(adapted, tok, root / "lora")
    set_adapter_base(root / "lora", root / "base")
    base = adapted.unload()
    with torch.no_grad():
        for param in base.parameters():
            param.mul_(1 + 0.05 * torch.randn_like(param))
    save_checkpoint(base, tok, root / "full")
    return root


@pytest.fixture(scope="module")
def texts():
    docs = collect_docstrings()[300:340]
    return [*docs, docs[0][:12], "x"]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fast_path_scores_equal_the_reference_code(checkpoints, texts, kind):
    plan = plan_models(str(checkpoints / kind), str(checkpoints / "base"))
    tokenizer = load_tokenizer(plan.tokenizer)
    tokens = tokenize(tokenizer, texts, MAX_LENGTH)
    backend = TorchBackend(plan, device="cpu", batch_size=5)
    fast = [
        score_sequence(stats, len(ids), 1)["ez_score"]
        for stats, ids in zip(backend.token_stats(tokens.input_ids), tokens.input_ids, strict=True)
    ]
    models = baseline.load_models(plan.target, plan.reference, kind == "lora")
    reference_code, exact_logprobs = (
        baseline.compute_ez_scores(tokenizer, *models, texts, "cpu", MAX_LENGTH, 4, dtype)
        for dtype in (torch.float32, torch.float64)
    )
    assert sum(score != 0 for score in reference_code) > len(texts) // 2
    np.testing.assert_allclose(fast, exact_logprobs, rtol=1e-5, atol=1e-7)
    # The reference code's fp32 log-softmax rounds log-probs by ~1e-6; EZ scores, ratios of
    # small log-prob shifts, move by up to a few 1e-5 from that alone.
    np.testing.assert_allclose(fast, reference_code, rtol=1e-4, atol=1e-6)


def test_tiled_statistics_equal_the_full_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 3000) * torch.linspace(0.1, 20, 64)[:, None]
    targets = torch.randint(0, 3000, (64,))
    targets[:8] = logits[:8].argmax(-1)
    logp = torch.log_softmax(logits.double(), -1)
    mu = (logp.exp() * logp).sum(-1)
    sigma = (logp.exp() * (logp - mu[:, None]).square()).sum(-1).sqrt()
    head = torch.nn.Linear(3000, 3000, bias=False).requires_grad_(False)
    head.weight.data = torch.eye(3000)
    tiled = [
        tiled_head_statistics(logits, targets, head, True, position_chunk=16, vocab_chunk=700),
        tiled_head_statistics(logits.clone(), targets, None, True, 20, vocab_chunk=640),
        # untiled: one tile holds every position and the whole vocabulary
        tiled_head_statistics(logits.clone(), targets, None, True, 64, vocab_chunk=3000),
    ]
    for got in tiled:
        np.testing.assert_allclose(got["lp"], logp.gather(1, targets[:, None])[:, 0], atol=1e-5)
        np.testing.assert_allclose(got["mu"], mu, atol=1e-4)
        np.testing.assert_allclose(got["sigma"], sigma, atol=1e-4)
        assert torch.equal(got["top1"], logits.argmax(-1) == targets)


@pytest.mark.parametrize("with_distribution", [False, True])
def test_compilable_tile_moments_equal_the_in_place_ones(with_distribution):
    torch.manual_seed(1)
    tile = torch.randn(50, 777) * 8
    tile[:5, 100:300] = float("-inf")
    top, sums = _pure_moments(tile, with_distribution)
    expected_top, expected_sums = _inplace_moments(tile.clone(), with_distribution)
    assert torch.equal(top, expected_top)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-6, atol=1e-6)
