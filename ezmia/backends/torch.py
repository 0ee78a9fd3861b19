"""PyTorch scoring backend: both passes with transformers, statistics chunked over positions.

Sequences are sorted by length and padded per batch. The LM head runs on chunks of real
(non-padding) positions only, so no batch x seq x vocab log-softmax is ever held at once.
An adapter target shares one copy of the base weights with its reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ezmia.models import ModelPlan, attach_adapter, load_causal_lm
from ezmia.scores import TokenStats

# Configs whose logits are transformed after the head: score them from full logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless asked otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def head_statistics(
    logits: torch.Tensor, targets: torch.Tensor, with_distribution: bool
) -> dict[str, torch.Tensor]:
    """True-token log-prob, top-1 hit and (optionally) mean/std of log p, per row of logits."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    stats = {
        "lp": logits.gather(-1, targets[:, None]).squeeze(-1) - lse,
        "top1": logits.argmax(dim=-1) == targets,
    }
    if with_distribution:
        logp = logits - lse[:, None]
        p = logp.exp()
        mu = (p * logp).sum(-1)
        stats["mu"] = mu
        stats["sigma"] = (p * (logp - mu[:, None]).square()).sum(-1).sqrt()
    return stats


class TorchBackend:
    """Scores with transformers models; works on CPU and CUDA, without Ray."""

    name = "torch"
    provides_distribution = True

    def __init__(
        self,
        plan: ModelPlan,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        position_chunk: int = 1024,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.position_chunk = position_chunk
        load = dict(
            dtype=self.dtype,
            device=self.device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        base = load_causal_lm(plan.reference, **load)
        if plan.target_is_adapter:
            # One copy of the base: the reference pass is the target with its adapter off.
            self.target = self.reference = attach_adapter(base, plan.target)
            self._reference_context = self.target.disable_adapter
        else:
            self.target, self.reference = load_causal_lm(plan.target, **load), base
            self._reference_context = contextlib.nullcontext

    def close(self) -> None:
        del self.target, self.reference
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def token_stats(self, sequences: Sequence[Sequence[int]]) -> list[TokenStats]:
        results: list[TokenStats] = [TokenStats.empty()] * len(sequences)
        order = sorted(
            (i for i, s in enumerate(sequences) if len(s) >= 2), key=lambda i: -len(sequences[i])
        )
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, stats in zip(
                batch, self._score_batch([sequences[i] for i in batch]), strict=True
            ):
                results[i] = stats
        return results

    def _score_batch(self, sequences: list[Sequence[int]]) -> list[TokenStats]:
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        target = self._pass(self.target, ids, mask, with_distribution=True)
        with self._reference_context():
            reference = self._pass(self.reference, ids, mask, with_distribution=False)
        lengths = [len(s) - 1 for s in sequences]
        split = {k: torch.split(v.cpu(), lengths) for k, v in target.items()}
        ref_lp = torch.split(reference["lp"].cpu(), lengths)
        return [
            TokenStats(
                lp_target=split["lp"][i].double().numpy(),
                lp_reference=ref_lp[i].double().numpy(),
                target_top1=split["top1"][i].numpy().astype(bool),
                mu=split["mu"][i].double().numpy(),
                sigma=split["sigma"][i].double().numpy(),
            )
            for i in range(len(sequences))
        ]

    def _pass(
        self, model, ids: torch.Tensor, mask: torch.Tensor, with_distribution: bool
    ) -> dict[str, torch.Tensor]:
        """Statistics of every real predicted position, concatenated row by row."""
        valid = mask[:, 1:].bool()
        targets = ids[:, 1:][valid]
        body, head = _body_and_head(model)
        if body is not None:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][valid]
            chunks = (head(h) for h in hidden.split(self.position_chunk))
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][valid]
            chunks = iter(logits.split(self.position_chunk))
        parts = [
            head_statistics(logits, t, with_distribution)
            for logits, t in zip(chunks, targets.split(self.position_chunk), strict=True)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _body_and_head(model):
    """The transformer body and LM head, or ``(None, None)`` when logits need the full model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_POSTPROCESSING):
        return None, None
    body = getattr(inner, inner.base_model_prefix, None)
    head = inner.get_output_embeddings()
    if body is None or not isinstance(head, torch.nn.Linear):
        return None, None
    return body, head
