"""What the benchmark measures with: the machine's matmul peak, peak memory, model FLOPs.

MFU (model FLOPs utilization) = model FLOPs / seconds / the fp32 (CPU) or bf16 (GPU) matmul
peak (best of repeated square matmuls) measured in the same process right before and after
the timed run. On CPU the run also reports
a CPU-time MFU: model FLOPs / process CPU seconds / one core's peak (a single-threaded matmul
timed by thread CPU time), which holds up when other processes share the cores.

Model FLOPs = 2 passes x 2 x N x real tokens, with N = parameters of the transformer body
without its embeddings + the LM head (d_model x vocab): the standard ``2 * N * tokens`` of a
forward pass. Attention-score FLOPs are not counted (about 1% at 128 tokens) and neither are
LoRA adapter FLOPs; padding is never useful work.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The matmul MFU is against, and the square-matmul sizes each peak is measured with.
MFU_PEAK = {"cpu": "float32", "cuda": "bfloat16"}
PEAK_SIZES = {
    "cpu": {"float32": 2048, "bfloat16": 512},
    "cuda": {"float32": 8192, "bfloat16": 8192},
}

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype,
    device: torch.device,
    n: int,
    seconds: float = 1.5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Best observed FLOP/s of an ``n x n @ n x n`` matmul, repeated for about ``seconds``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    best, spent = 0.0, 0.0
    while spent < seconds or best == 0.0:
        started = clock()
        a @ b
        _sync(device)
        elapsed = clock() - started
        best, spent = max(best, 2 * n**3 / elapsed), spent + elapsed
    return best


def mfu_peak(device: torch.device) -> float:
    """FLOP/s of the matmul MFU is measured against (``MFU_PEAK``: fp32 on CPU, bf16 on GPU)."""
    name = MFU_PEAK[device.type]
    return matmul_peak(getattr(torch, name), device, PEAK_SIZES[device.type][name])


def core_peak(n: int = 2048) -> float:
    """One CPU core's fp32 matmul FLOP/s, by thread CPU time (blind to time-sharing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_peak(torch.float32, torch.device("cpu"), n, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)


def machine_peaks(device: torch.device) -> dict[str, float]:
    """fp32 and bf16 matmul peaks in FLOP/s (and one core's fp32 peak on CPU). On CPU the bf16
    matrix is small: without AVX512-BF16/AMX, PyTorch's bf16 matmul is far slower than fp32."""
    sizes = PEAK_SIZES[device.type]
    peaks = {name: matmul_peak(getattr(torch, name), device, n) for name, n in sizes.items()}
    return {**peaks, "float32_core": core_peak()} if device.type == "cpu" else peaks


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory of a block of work: CUDA max allocated on GPU; on CPU the process's peak
    RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` when the block starts)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        _CLEAR_REFS.write_text("5")
        self.before = _status_kib("VmRSS") * 1024

    def stop(self) -> dict[str, float]:
        """``peak_mb`` (everything, models included) and ``delta_mb`` (above the start)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        return {"peak_mb": peak / 2**20, "delta_mb": (peak - self.before) / 2**20}


class Timer:
    """Wall-clock and process CPU seconds of a block, synchronizing the accelerator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.figures: dict[str, float] = {}

    def __enter__(self) -> Timer:
        _sync(self.device)
        self._started = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        wall, cpu = self._started
        self.figures = {
            "seconds": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
        }


def flop_params(model: torch.nn.Module) -> int:
    """N of ``2 * N * tokens``: body parameters without embeddings, plus the LM head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix)
    embeddings = {
        id(p) for m in body.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    n_body = sum(p.numel() for p in body.parameters() if id(p) not in embeddings)
    head = inner.get_output_embeddings()
    return n_body + head.weight.numel()


def hardware(device: torch.device) -> dict[str, object]:
    """A short description of where the benchmark ran."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
