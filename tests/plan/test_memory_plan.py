"""The GPU memory plan for Llama-3-8B and -70B shaped configs on 24, 80 and 141 GB GPUs.

GPU sizes are what the device reports (A10G 24 GB: 22 GiB; A100/H100 80 GB: 79 GiB; H200
141 GB: 139 GiB). Worked by hand (bf16, max_model_len 8192, GiB = 2**30 bytes):

Llama-3-8B: 32 x (q,o 2*4096*4096 + MLP 3*4096*14336) + k,v 32*2*4096*1024 + embeddings and
head 2*128256*4096 = 8,029,995,008 parameters (8,030,261,248 with norms): 14.96 GiB of bf16
weights. KV: 2*32*8*128*2 = 128 KiB per token. Logits of a 8192-token step:
8192*128256*10 B = 9.79 GiB (<= 79/8), of 2048 tokens: 2.45 GiB.
- 80 GB, TP 1: utilization floor(100*(79 - 9.79 - 2)/79)/100 = 0.85 -> 67.15 GiB for vLLM;
  minus weights 14.96 and activations 8192*(4*4096 + 3*14336)*2 B = 0.91 leaves 51.29 GiB of
  KV cache (2 GiB needed for 8192 + 8192 tokens).
- 24 GB, TP 1: 8192 and 4096-token logits exceed 22/8 GiB; 2048: floor(100*(22 - 2.45 - 2)
  /22)/100 = 0.79 -> 17.38 GiB, minus 14.96 and 0.23 leaves 2.20 GiB (1.25 needed).
Llama-3-70B: 70,552,387,584 parameters: 131.41 GiB bf16; 65.71 at TP 2. KV 2*80*8*128*2 =
320 KiB per token, 160 KiB at TP 2.
- 80 GB, TP 2, 8192 tokens: 67.15 - 65.71 - 1.16 (activations) = 0.28 GiB < 2.5 needed;
  4096: utilization floor(100*(79 - 4.89 - 2)/79)/100 = 0.91 -> 71.89 - 65.71 - 0.58 = 5.60.
- TP 1 anywhere: weights 131.41 + activations 0.11 + KV (8192 + 512) * 320 KiB 2.66 =
  134.18 GiB / 0.95 = 141.2 -> needs 142 GiB; the fix on 80 GB GPUs is TP 2.
"""

from __future__ import annotations

import pytest

from ezmia.errors import InputError, ModelError
from ezmia.plan.memory import GIB, LOGIT_BYTES, OVERHEAD_BYTES, Shape, engine_settings, plan_memory

LLAMA_3_8B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_3_70B = {
    **LLAMA_3_8B,
    "num_hidden_layers": 80,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
}
MODELS = {"8B": LLAMA_3_8B, "70B": LLAMA_3_70B}
GPUS = {"24GB": 22, "80GB": 79, "141GB": 139}  # GiB the device reports

# (model, GPU, TP) -> (gpu_memory_utilization, max_num_batched_tokens, KV cache GiB) or the
# tensor_parallel_size the refusal proposes (None: only a bigger GPU helps).
EXPECTED = {
    ("8B", "24GB", 1): (0.79, 2048, 2.20),
    ("8B", "24GB", 2): (0.79, 2048, 9.76),
    ("8B", "24GB", 4): (0.79, 2048, 13.54),
    ("8B", "24GB", 8): (0.79, 2048, 15.43),
    ("8B", "80GB", 1): (0.85, 8192, 51.29),
    ("8B", "80GB", 2): (0.85, 8192, 59.09),
    ("8B", "80GB", 4): (0.85, 8192, 63.00),
    ("8B", "80GB", 8): (0.85, 8192, 64.95),
    ("8B", "141GB", 1): (0.91, 8192, 110.63),
    ("8B", "141GB", 2): (0.91, 8192, 118.43),
    ("8B", "141GB", 4): (0.91, 8192, 122.34),
    ("8B", "141GB", 8): (0.91, 8192, 124.29),
    ("70B", "24GB", 1): 8,
    ("70B", "24GB", 2): 8,
    ("70B", "24GB", 4): 8,
    ("70B", "24GB", 8): (0.79, 2048, 0.79),
    ("70B", "80GB", 1): 2,
    ("70B", "80GB", 2): (0.91, 4096, 5.60),
    ("70B", "80GB", 4): (0.85, 8192, 33.47),
    ("70B", "80GB", 8): (0.85, 8192, 50.06),
    ("70B", "141GB", 1): 2,
    ("70B", "141GB", 2): (0.91, 8192, 59.63),
    ("70B", "141GB", 4): (0.91, 8192, 92.81),
    ("70B", "141GB", 8): (0.91, 8192, 109.40),
}


def _plan(model: str, gpu_gib: float, tp: int):
    return plan_memory(
        MODELS[model],
        model=f"llama-3-{model.lower()}",
        dtype="bfloat16",
        tensor_parallel_size=tp,
        gpu_memory_bytes=int(gpu_gib * GIB),
        max_model_len=8192,
    )


def test_parameter_counts_match_the_published_llama_3_sizes():
    # one byte per parameter on one GPU: the parameter count (norms left out: < 0.01%)
    assert Shape.from_config(LLAMA_3_8B, "8b").weights_per_gpu(1, 1) == 8_029_995_008
    assert Shape.from_config(LLAMA_3_70B, "70b").weights_per_gpu(1, 1) == 70_552_387_584


@pytest.mark.parametrize(("model", "gpu", "tp"), sorted(EXPECTED))
def test_plan_matches_the_hand_worked_budget(model, gpu, tp):
    expected = EXPECTED[(model, gpu, tp)]
    if isinstance(expected, int):
        with pytest.raises(ModelError, match=f"tensor_parallel_size={expected} "):
            _plan(model, GPUS[gpu], tp)
        return
    plan = _plan(model, GPUS[gpu], tp)
    utilization, tokens, kv_gib = expected
    assert plan.gpu_memory_utilization == utilization
    assert plan.max_num_batched_tokens == tokens
    assert plan.kv_cache_bytes / GIB == pytest.approx(kv_gib, abs=0.006)
    # the logits spike and the fixed overhead fit in what vLLM leaves of the GPU
    outside = (1 - plan.gpu_memory_utilization) * GPUS[gpu] * GIB
    assert plan.logits_bytes == tokens * 128256 * LOGIT_BYTES
    assert plan.logits_bytes + OVERHEAD_BYTES <= outside


def test_refusal_names_model_need_and_both_fixes_and_the_fixes_work():
    with pytest.raises(ModelError) as err:
        _plan("70B", GPUS["80GB"], 1)
    message = str(err.value)
    assert message.startswith("llama-3-70b does not fit: in bfloat16 at tensor_parallel_size=1")
    assert "needs 142 GiB per GPU (131.4 GiB of weights" in message
    assert message.endswith(
        "use tensor_parallel_size=2 (GPUs per model stage) or GPUs with >= 142 GiB each"
    )
    assert _plan("70B", GPUS["80GB"], 2).max_num_batched_tokens == 4096
    assert _plan("70B", 142, 1).gpu_memory_utilization == 0.95


def test_refusal_without_a_tensor_parallel_fix_asks_only_for_bigger_gpus():
    # TP 8: weights 16.43 + activations 0.04 + KV 8704 * 40 KiB 0.33 = 16.80 GiB; with 512-token
    # logits (0.61) and the overhead (2) outside: 19.41 / 0.99 -> 20 GiB
    with pytest.raises(ModelError, match=r"the GPU has 16 GiB: use GPUs with >= 20 GiB each$"):
        _plan("70B", 16, 8)
    assert _plan("70B", 20, 8).max_num_batched_tokens == 512


def test_tensor_parallel_size_must_divide_the_attention_heads():
    with pytest.raises(
        InputError, match="tensor_parallel_size=3: .* 32 attention heads: use one of 1, 2, 4, 8"
    ):
        _plan("8B", GPUS["80GB"], 3)


def test_incomplete_config_is_refused_naming_the_missing_key():
    config = {k: v for k, v in LLAMA_3_8B.items() if k != "intermediate_size"}
    with pytest.raises(ModelError, match="m: config.json lacks 'intermediate_size'"):
        plan_memory(config, model="m", dtype="bfloat16", tensor_parallel_size=1,
                    gpu_memory_bytes=80 * GIB, max_model_len=8192)  # fmt: skip


def test_engine_args_are_the_two_planned_vllm_settings():
    plan = _plan("8B", GPUS["24GB"], 1)
    assert plan.engine_args() == {"gpu_memory_utilization": 0.79, "max_num_batched_tokens": 2048}


def test_two_engines_sharing_a_gpu_each_get_the_plan_of_half_of_it():
    gpu = 79 * GIB
    half = plan_memory(LLAMA_3_8B, model="8b", dtype="bfloat16", tensor_parallel_size=1,
                       gpu_memory_bytes=gpu // 2, max_model_len=8192)  # fmt: skip
    shared = engine_settings(LLAMA_3_8B, model="8b", dtype="bfloat16", tensor_parallel_size=1,
                             gpu_memory_bytes=gpu, max_model_len=8192, engines_per_gpu=2,
                             requested_share=0.4)  # fmt: skip
    assert shared["max_num_batched_tokens"] == half.max_num_batched_tokens
    assert shared["gpu_memory_utilization"] == min(0.4, half.gpu_memory_utilization / 2)


def test_the_user_share_is_never_raised_by_the_plan():
    settings = engine_settings(LLAMA_3_8B, model="8b", dtype="bfloat16", tensor_parallel_size=1,
                               gpu_memory_bytes=139 * GIB, max_model_len=8192,
                               engines_per_gpu=1, requested_share=0.3)  # fmt: skip
    assert settings["gpu_memory_utilization"] == 0.3


def test_two_copies_of_an_8b_model_do_not_fit_one_24_gb_gpu():
    with pytest.raises(ModelError, match="8b"):
        engine_settings(LLAMA_3_8B, model="8b", dtype="bfloat16", tensor_parallel_size=1,
                        gpu_memory_bytes=22 * GIB, max_model_len=8192, engines_per_gpu=2,
                        requested_share=0.4)  # fmt: skip
