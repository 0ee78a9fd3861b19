"""The EZ-MIA reference code's scoring path, re-implemented as the benchmark baseline.

Faithful to ``compute_ez_scores`` in JetBrains-Research/ez-mia (``mia/models.py``): every
batch is padded to the full ``sequence_length``; the target runs over all texts, then the
reference; each pass keeps the KV cache (``use_cache=True``), materializes the fp32
full-vocabulary log-softmax, gathers the true token and takes ``topk(k=1)``; the score is a
per-sample Python loop. Only the EZ score is computed, as in the reference code. One change:
``add_special_tokens=False``, so the token ids equal ezmia's. ``logprob_dtype=torch.float64``
(with float64 models) turns the same code into an oracle free of fp32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def load_models(
    target: Path, reference: Path, adapter: bool, device: str = "cpu", dtype: str = "float32"
):
    """Target and reference as the reference code holds them: two independent models (a LoRA
    target is its own copy of the base with the adapter on it)."""
    from transformers import AutoModelForCausalLM

    def load(path: Path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        return model.to(device).eval()

    ref_model = load(reference)
    if not adapter:
        return load(target), ref_model
    from peft import PeftModel

    return PeftModel.from_pretrained(load(reference), str(target)).eval(), ref_model


def extract_stats(
    model,
    tokenizer,
    texts: list[str],
    device: str,
    sequence_length: int,
    batch_size: int,
    logprob_dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """Per-sample true-token log-probs, top-1 ids, targets and mask of one model."""
    model.eval()
    model.config.use_cache = True
    stats = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding="max_length",
                truncation=True,
                max_length=sequence_length,
                return_tensors="pt",
                add_special_tokens=False,
            )
            input_ids = enc["input_ids"].to(device)
            attention_mask = enc["attention_mask"].to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            lp = F.log_softmax(logits[:, :-1, :].to(logprob_dtype), dim=-1)
            target_ids = input_ids[:, 1:]
            correct = lp.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
            top1 = torch.topk(lp, k=1, dim=-1).indices.squeeze(-1)
            for b in range(input_ids.shape[0]):
                stats.append(
                    {
                        "correct": correct[b].cpu(),
                        "top1_idx": top1[b].cpu(),
                        "target_ids": target_ids[b].cpu(),
                        "mask": attention_mask[b, 1:].cpu(),
                    }
                )
    return stats


def error_zone_ratio(target: dict, reference: dict, min_errors: int = 2) -> float:
    """Positive over negative log-prob shift where the target's top-1 is wrong; the first
    scored position is skipped; fewer than ``min_errors`` errors or no negative shift give 0."""
    keep = target["mask"].bool().clone()
    keep[0] = False
    errors = keep & (target["top1_idx"] != target["target_ids"])
    if int(errors.sum()) < min_errors:
        return 0.0
    delta = (target["correct"] - reference["correct"])[errors].double()
    positive = float(delta[delta > 0].sum())
    negative = float(-delta[delta < 0].sum())
    return positive / negative if negative > 0 else 0.0


def compute_ez_scores(
    tokenizer,
    target_model,
    reference_model,
    texts: list[str],
    device: str = "cpu",
    sequence_length: int = 128,
    batch_size: int = 16,
    logprob_dtype: torch.dtype = torch.float32,
) -> list[float]:
    """EZ score of every text: all target passes, then all reference passes, then a loop."""
    args = (tokenizer, texts, device, sequence_length, batch_size, logprob_dtype)
    target = extract_stats(target_model, *args)
    reference = extract_stats(reference_model, *args)
    return [error_zone_ratio(t, r) for t, r in zip(target, reference, strict=True)]
