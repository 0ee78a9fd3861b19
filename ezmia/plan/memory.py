"""Memory plan for one vLLM model stage: how much of each GPU vLLM may claim and how many
prompt tokens one engine step may hold, so that the prompt-logprob logits fit.

vLLM sizes its KV cache from a profiling run that does not count the logits of prompt
log-probs: one step of ``T`` prompt tokens materializes ``T x vocab`` logits, gathered in
full on a GPU whatever the tensor parallelism, in the compute dtype, then in fp32, then their
fp32 log-softmax (``LOGIT_BYTES`` per entry; 8k tokens x 128k vocabulary ~10 GB). The plan
keeps that spike and a fixed overhead outside vLLM's share (``gpu_memory_utilization``) and
checks that the share holds the weights, the step's activations and a KV cache for one
longest sequence plus one step. Pure arithmetic on the model's config: no I/O, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ezmia.errors import InputError, ModelError

GIB = 1 << 30
# bf16/fp16 logits from the LM head + their fp32 copy + the fp32 log-softmax, per entry.
LOGIT_BYTES = 2 + 4 + 4
# Per GPU, outside vLLM's share: CUDA context, NCCL buffers, CUDA graphs, fragmentation.
OVERHEAD_BYTES = 2 * GIB
# Tokens per engine step, largest first: prefill throughput gains little beyond 8k. A step's
# logits may take up to LOGITS_SHARE of the GPU; the rest goes to weights and KV cache.
STEP_TOKENS = (8192, 4096, 2048, 1024, 512)
LOGITS_SHARE = 1 / 8
MAX_UTILIZATION = 0.95
# GPUs in one node: the largest tensor parallelism the plan proposes.
MAX_TENSOR_PARALLEL = 8
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Shape:
    """What the plan needs from a decoder-only transformer's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model: str) -> Shape:
        """Read a Hugging Face ``config.json`` (Llama/Mistral/Qwen key names)."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                layers=int(config["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(
                f"{model}: config.json lacks {err} needed for the GPU memory plan: "
                "use a checkpoint with a complete Hugging Face config"
            ) from err

    def weights_per_gpu(self, tp: int, dtype_bytes: int) -> int:
        """Weight bytes on each of ``tp`` GPUs: everything split ``tp`` ways, except that
        key/value heads are replicated once ``tp`` exceeds their number."""
        q_and_o = 2 * self.hidden * self.heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        sharded = self.layers * (q_and_o + mlp) + embeddings
        kv_heads = max(1, self.kv_heads // tp)
        kv_projection = self.layers * 2 * self.hidden * kv_heads * self.head_dim
        return (sharded // tp + kv_projection) * dtype_bytes

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int) -> int:
        """KV cache bytes per token on each GPU."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * dtype_bytes

    def activation_bytes(self, tokens: int, tp: int, dtype_bytes: int) -> int:
        """Peak activations of one step in vLLM's profile: residual, normed input, attention
        in/out per token, and the MLP's gate, up and product split ``tp`` ways."""
        return tokens * (4 * self.hidden + 3 * self.intermediate // tp) * dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """vLLM engine settings for one model stage, and the per-GPU budget behind them."""

    gpu_memory_utilization: float
    max_num_batched_tokens: int
    weights_bytes: int
    logits_bytes: int
    kv_cache_bytes: int

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (chunked prefill, vLLM's default, splits longer
        prompts across steps; ``max_num_seqs`` must stay <= ``max_num_batched_tokens``)."""
        return {
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }


def plan_memory(
    config: Mapping[str, Any],
    *,
    model: str,
    dtype: str,
    tensor_parallel_size: int,
    gpu_memory_bytes: int,
    max_model_len: int,
) -> MemoryPlan:
    """The largest step (``STEP_TOKENS``) whose logits take at most ``LOGITS_SHARE`` of the
    GPU and fit beside the weights and a KV cache for one ``max_model_len`` sequence plus one
    step; ModelError (naming the need and the fix) when not even the smallest step fits."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"dtype {dtype!r}: the memory plan knows {', '.join(DTYPE_BYTES)}")
    shape = Shape.from_config(config, model)
    tp = tensor_parallel_size
    if tp < 1 or shape.heads % tp:
        raise InputError(
            f"tensor_parallel_size={tp}: it must divide {model}'s {shape.heads} attention "
            f"heads: use one of {', '.join(map(str, _divisors(shape.heads)))}"
        )
    size, gpu = DTYPE_BYTES[dtype], gpu_memory_bytes
    weights = shape.weights_per_gpu(tp, size)
    share = gpu * LOGITS_SHARE
    steps = [t for t in STEP_TOKENS if t * shape.vocab * LOGIT_BYTES <= share] or STEP_TOKENS[-1:]
    for tokens in steps:
        logits = tokens * shape.vocab * LOGIT_BYTES
        utilization = min(
            MAX_UTILIZATION, math.floor(100 * (gpu - logits - OVERHEAD_BYTES) / gpu) / 100
        )
        kv_needed = (max_model_len + tokens) * shape.kv_bytes_per_token(tp, size)
        kv_left = int(utilization * gpu) - weights - shape.activation_bytes(tokens, tp, size)
        if kv_left >= kv_needed:
            return MemoryPlan(utilization, tokens, weights, logits, kv_left)
    raise ModelError(_refusal(shape, model, dtype, tp, gpu, max_model_len))


def _need(shape: Shape, size: int, tp: int, max_model_len: int) -> int:
    """GPU memory the smallest step needs: what the refusal asks for."""
    tokens = STEP_TOKENS[-1]
    within = (
        shape.weights_per_gpu(tp, size)
        + shape.activation_bytes(tokens, tp, size)
        + (max_model_len + tokens) * shape.kv_bytes_per_token(tp, size)
    )
    outside = tokens * shape.vocab * LOGIT_BYTES + OVERHEAD_BYTES
    # utilization is rounded down to a hundredth: at most 1% of the GPU lost to rounding
    return max(math.ceil(within / MAX_UTILIZATION), math.ceil((within + outside) / 0.99))


def _refusal(shape: Shape, model: str, dtype: str, tp: int, gpu: int, max_model_len: int) -> str:
    size = DTYPE_BYTES[dtype]
    need = _need(shape, size, tp, max_model_len)
    fits = [
        t for t in _divisors(shape.heads) if t > tp and _need(shape, size, t, max_model_len) <= gpu
    ]
    fix = f"GPUs with >= {math.ceil(need / GIB)} GiB each"
    if fits:
        fix = f"tensor_parallel_size={fits[0]} (GPUs per model stage) or {fix}"
    return (
        f"{model} does not fit: in {dtype} at tensor_parallel_size={tp} it needs "
        f"{math.ceil(need / GIB)} GiB per GPU ({shape.weights_per_gpu(tp, size) / GIB:.1f} GiB "
        f"of weights, a KV cache for {max_model_len} tokens and the prompt-logprob logits), "
        f"the GPU has {gpu / GIB:.0f} GiB: use {fix}"
    )


def _divisors(n: int) -> list[int]:
    """Tensor-parallel sizes for ``n`` attention heads within one node's GPUs."""
    return [d for d in range(1, MAX_TENSOR_PARALLEL + 1) if n % d == 0]


def engine_settings(
    config: Mapping[str, Any],
    *,
    model: str,
    dtype: str,
    tensor_parallel_size: int,
    gpu_memory_bytes: int,
    max_model_len: int,
    engines_per_gpu: int,
    requested_share: float,
) -> dict[str, Any]:
    """``vllm.LLM`` memory settings of one engine among ``engines_per_gpu`` sharing each GPU:
    the memory plan of its slice of the GPU, with vLLM's share never above what the user
    asked (``requested_share``, already this engine's part of the GPU)."""
    plan = plan_memory(
        config,
        model=model,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_bytes=gpu_memory_bytes // engines_per_gpu,
        max_model_len=max_model_len,
    )
    share = plan.gpu_memory_utilization / engines_per_gpu
    return {**plan.engine_args(), "gpu_memory_utilization": min(requested_share, share)}
