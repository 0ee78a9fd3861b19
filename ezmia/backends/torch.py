"""PyTorch scoring backend: both passes with transformers, the LM head fused with its statistics.

Sequences are sorted by length, grouped into the batches that pad least (``length_batches``)
and right-padded per batch; a batch's last position predicts nothing and is not fed. A causal
model needs no attention mask for right padding (a real position never attends to a later
one), so SDPA keeps its fast causal kernel. The LM head runs tile by tile (``position_chunk``
real positions x ``vocab_chunk`` vocabulary entries) and each tile is reduced at once, while
it sits in cache, to per-row partial statistics that merge like an online logsumexp: no
positions x vocabulary matrix is ever held. An adapter target shares one copy of the base
weights with its reference.

A backend runs one model stage's pass (``role`` target or reference) or both. On an actor that
sees several CUDA GPUs (a stage with ``gpus_per_actor`` > 1), the model is spread over them
(``device_map="auto"``, layers split by accelerate, untested here: no GPUs); the head's
statistics run where the head lives.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ezmia.backends import check_device
from ezmia.backends.base import PassColumns, Role, ScoringBackend
from ezmia.plan.models import ModelPlan, attach_adapter, load_causal_lm

# Configs whose logits are transformed after the head: score them from full logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# (position_chunk, vocab_chunk) per device type: a few MB of fp32 logits per tile on CPU (cache
# resident), large tiles on accelerators (fewer kernel launches).
_TILES = {"cpu": (1024, 2048)}
_ACCELERATOR_TILES = (4096, 32768)

# The fixed cost of one forward pass in tokens' worth of compute, per device type: measured on
# CPU (GPT-2 small: a pass of 1 x 128 tokens takes as long as 149 in a batch of 16), so short
# sequences get batches of their own. On accelerators a pass of few rows costs nearly a full
# one (unmeasured here), so batches stay full: fewest passes, then least padding.
_PASS_OVERHEAD_TOKENS = {"cpu": 32}
_ACCELERATOR_PASS_OVERHEAD_TOKENS = 2**40


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless asked otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class _Partial(NamedTuple):
    """Per-row statistics of the logits over part of the vocabulary: the maximum ``top``, the
    true token's logit (0 where it lies outside the part), and ``moments`` (float64; one
    column without the distribution, three with it): the sums of ``e``, ``e*z`` and ``e*z**2``
    over the part, where ``z = logit - top`` and ``e = exp(z)``."""

    top: torch.Tensor
    target: torch.Tensor
    moments: torch.Tensor


Moments = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]

# A finite floor for a tile's maximum keeps rows of -inf logits from turning into NaN.
_FLOOR = torch.finfo(torch.float32).min


def _inplace_moments(logits: torch.Tensor, with_distribution: bool):
    """``(top, moments)`` of a tile, overwriting it: each pass runs while the tile is in cache
    (the CPU path)."""
    logits = logits.float()
    top = logits.amax(dim=-1).clamp_min(_FLOOR)
    z = logits.sub_(top[:, None])
    if not with_distribution:
        return top, _precise_sum(z.exp_())[:, None]
    e = z.clamp_min_(-1e30).exp()  # a -inf logit has p = 0 and adds nothing (not 0 * -inf)
    s0 = _precise_sum(e)
    ez = e.mul_(z)
    return top, torch.stack([s0, ez.sum(-1).double(), torch.linalg.vecdot(ez, z).double()], -1)


def _pure_moments(logits: torch.Tensor, with_distribution: bool):
    """The same as ``_inplace_moments`` without writing to the tile: the form ``torch.compile``
    fuses into one or two reads of the tile (the accelerator path, where eager passes over
    tiles too big for cache would cost more than the head's matmul)."""
    x = logits.float()
    top = x.amax(dim=-1).clamp_min(_FLOOR)
    z = (x - top[:, None]).clamp_min(-1e30)
    e = z.exp()
    sums = [e.sum(-1, dtype=torch.float64)]
    if with_distribution:
        sums += [(e * z).sum(-1, dtype=torch.float64), (e * z * z).sum(-1, dtype=torch.float64)]
    return top, torch.stack(sums, -1)


def _tile_partial(
    logits: torch.Tensor,
    offset: int,
    targets: torch.Tensor,
    with_distribution: bool,
    moments: Moments = _inplace_moments,
) -> _Partial:
    """Partial statistics of a tile of logits covering vocabulary ``offset:offset+width``
    (which ``moments`` may overwrite)."""
    width = logits.shape[-1]
    local = targets - offset
    inside = (local >= 0) & (local < width)
    target = logits.gather(-1, local.clamp(0, width - 1)[:, None]).squeeze(-1)
    top, sums = moments(logits, with_distribution)
    return _Partial(top, target.float().where(inside, 0.0), sums)


def _precise_sum(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Row sums of ``x`` in float64 over fp32 sums of ``block`` entries. A plain fp32 sum over
    the vocabulary rounds log-probs by ~1e-6, which moves EZ scores (ratios of small log-prob
    shifts) by ~1e-5; converting whole tiles to float64 first costs a quarter of the head."""
    if x.shape[-1] % block:
        return x.sum(-1, dtype=torch.float64)
    return x.reshape(x.shape[0], -1, block).sum(-1).sum(-1, dtype=torch.float64)


def _rebase(part: _Partial, top: torch.Tensor) -> torch.Tensor:
    """``part.moments`` re-expressed relative to ``top`` (>= ``part.top``)."""
    d = (part.top - top).double()
    s = part.moments
    columns = [s[:, 0]]
    if s.shape[1] == 3:
        columns.append(s[:, 1] + d * s[:, 0])
        columns.append(s[:, 2] + 2 * d * s[:, 1] + d.square() * s[:, 0])
    return torch.stack(columns, -1) * d.exp()[:, None]


def _merge(a: _Partial, b: _Partial) -> _Partial:
    """Statistics of the union of two disjoint vocabulary parts."""
    top = torch.maximum(a.top, b.top)
    return _Partial(top, a.target + b.target, _rebase(a, top) + _rebase(b, top))


def _finish(part: _Partial) -> dict[str, torch.Tensor]:
    """True-token log-prob, top-1 hit and (with three moments) mean/std of log p.

    The top-1 hit is "the true token attains the maximum logit" (vLLM's rank 1); it differs
    from ``argmax == token`` only on an exact tie.
    """
    s = part.moments
    log_s0 = s[:, 0].log()
    stats = {
        "lp": part.target.double() - part.top.double() - log_s0,
        "top1": part.target >= part.top,
    }
    if s.shape[1] == 3:
        mean_z = s[:, 1] / s[:, 0]
        stats["mu"] = mean_z - log_s0
        stats["sigma"] = (s[:, 2] / s[:, 0] - mean_z.square()).clamp_min(0).sqrt()
    return stats


def _tiles(
    rows: torch.Tensor, head: torch.nn.Linear | None, vocab_chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(offset, logits)`` of each vocabulary slice: the head applied to hidden-state ``rows``,
    or slices of ``rows`` themselves when they are logits (``head`` None)."""
    width = rows.shape[-1] if head is None else head.out_features
    for offset in range(0, width, vocab_chunk):
        cols = slice(offset, offset + vocab_chunk)
        if head is None:
            yield offset, rows[:, cols]
        else:
            bias = None if head.bias is None else head.bias[cols]
            yield offset, torch.nn.functional.linear(rows, head.weight[cols], bias)


def tiled_head_statistics(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Linear | None,
    with_distribution: bool,
    position_chunk: int,
    vocab_chunk: int,
    moments: Moments = _inplace_moments,
) -> dict[str, torch.Tensor]:
    """True-token log-prob, top-1 hit and (optionally) mean/std of log p, per row of
    ``head(hidden)`` (or of ``hidden`` as logits when ``head`` is None, which the default
    ``moments`` overwrites), tile by tile without holding all the logits."""
    parts = []
    for rows, row_targets in zip(
        hidden.split(position_chunk), targets.split(position_chunk), strict=True
    ):
        partials = (
            _tile_partial(tile, offset, row_targets, with_distribution, moments)
            for offset, tile in _tiles(rows, head, vocab_chunk)
        )
        parts.append(_finish(functools.reduce(_merge, partials)))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _pick_moments(device: torch.device, dtype: torch.dtype) -> Moments:
    """The tile statistics: eager and in place on CPU; on accelerators compiled into fused
    kernels for tiles of ``dtype``, falling back to eager, with a warning, when compiling
    fails."""
    if device.type == "cpu":
        return _inplace_moments
    compiled = torch.compile(_pure_moments, dynamic=True)
    try:
        for with_distribution in (False, True):  # compile now, not in the first batch
            compiled(torch.zeros(2, 64, device=device, dtype=dtype), with_distribution)
    except Exception as err:  # torch.compile fails in many ways (no compiler, backend bugs)
        warnings.warn(
            f"torch.compile of the LM-head statistics failed ({type(err).__name__}: {err}); "
            "using eager kernels",
            stacklevel=2,
        )
        return _inplace_moments
    return compiled


def length_batches(lengths: Sequence[int], max_rows: int, overhead: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``max_rows``, longest first, that minimize
    the padded tokens of all batches plus ``overhead`` tokens per batch (dynamic programming
    over the runs of the sorted lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = np.array([lengths[i] for i in order], dtype=np.int64)
    cost = np.zeros(len(order) + 1, dtype=np.int64)
    start = np.zeros(len(order) + 1, dtype=np.int64)
    for end in range(1, len(order) + 1):
        first = np.arange(max(0, end - max_rows), end)
        candidates = cost[first] + (end - first) * widths[first]
        best = int(candidates.argmin())  # the first minimum: the largest batch
        start[end], cost[end] = first[best], candidates[best] + overhead
    batches, end = [], len(order)
    while end:
        batches.append(order[start[end] : end])
        end = int(start[end])
    return batches[::-1]


class TorchBackend(ScoringBackend):
    """Scores with transformers models; works on CPU and CUDA, without Ray.

    The LM-head tile and the cost of a forward pass are picked for the device type
    (``_TILES``, ``_PASS_OVERHEAD_TOKENS``). ``vocab_size`` is the number of token ids both
    models can embed and predict.
    """

    name = "torch"
    provides_distribution = True

    def __init__(
        self,
        plan: ModelPlan,
        *,
        role: Role = "both",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        check_device(device)  # also on a Ray actor, whose node may differ from the driver's
        self.role = role
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if device == "auto" else device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self._tile = _TILES.get(self.device.type, _ACCELERATOR_TILES)
        self._pass_overhead = _PASS_OVERHEAD_TOKENS.get(
            self.device.type, _ACCELERATOR_PASS_OVERHEAD_TOKENS
        )
        self._moments = _pick_moments(self.device, self.dtype)
        load = dict(
            dtype=self.dtype,
            device=self.device,
            spread=self.device.type == "cuda" and device in ("auto", "cuda"),
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        self.target = self.reference = None
        self._reference_context = contextlib.nullcontext
        if plan.target_is_adapter and role != "reference":
            # One copy of the base: the reference pass is the target with its adapter off.
            self.target = attach_adapter(
                _fuse_activations(load_causal_lm(plan.reference, **load)), plan.target
            )
            self.reference = self.target if role == "both" else None
            self._reference_context = self.target.disable_adapter
        else:
            if role != "reference":
                self.target = _fuse_activations(load_causal_lm(plan.target, **load))
            if role != "target":
                self.reference = _fuse_activations(load_causal_lm(plan.reference, **load))
        loaded = [m for m in (self.target, self.reference) if m is not None]
        self.vocab_size = min(_vocab_size(m) for m in loaded)
        # Padding is never attended to; any id but the pad id keeps transformers from warning
        # that a mask is missing.
        self._fill = 1 if getattr(loaded[0].config, "pad_token_id", None) == 0 else 0
        self._input_device = _input_device(loaded[0], self.device)

    def close(self) -> None:
        del self.target, self.reference
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def pass_columns(self, sequences: Sequence[Sequence[int]]) -> PassColumns:
        columns = self.empty_columns(len(sequences))
        scored = [i for i, s in enumerate(sequences) if len(s) >= 2]
        lengths = [len(sequences[i]) for i in scored]
        for rows in length_batches(lengths, self.batch_size, self._pass_overhead):
            batch = [scored[row] for row in rows]
            for name, values in self._score_batch([sequences[i] for i in batch]).items():
                for i, value in zip(batch, values, strict=True):
                    columns[name][i] = value
        return columns

    def _score_batch(self, sequences: list[Sequence[int]]) -> dict[str, list[np.ndarray]]:
        rows = [torch.as_tensor(seq, dtype=torch.long) for seq in sequences]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self._fill)
        lengths = torch.tensor([len(s) for s in sequences])
        valid = torch.arange(1, ids.shape[1]) < lengths[:, None]
        ids, valid = ids.to(self._input_device), valid.to(self._input_device)
        out: dict[str, torch.Tensor] = {}
        if self.target is not None:
            target = self._pass(self.target, ids, valid, with_distribution=True)
            names = {"lp": "lp_target", "top1": "target_top1", "mu": "mu", "sigma": "sigma"}
            out.update((names[key], values) for key, values in target.items())
        if self.reference is not None:
            with self._reference_context():
                out["lp_reference"] = self._pass(self.reference, ids, valid, False)["lp"]
        counts = (lengths - 1).tolist()
        return {name: [v.numpy() for v in x.cpu().split(counts)] for name, x in out.items()}

    def _pass(
        self, model, ids: torch.Tensor, valid: torch.Tensor, with_distribution: bool
    ) -> dict[str, torch.Tensor]:
        """Statistics of every real predicted position, concatenated row by row (no attention
        mask: see the module docstring)."""
        targets, inputs = ids[:, 1:][valid], ids[:, :-1]
        body, head = _body_and_head(model)
        if body is not None:
            hidden = body(input_ids=inputs, use_cache=False).last_hidden_state
            hidden = hidden[valid.to(hidden.device)].to(head.weight.device)
            moments = self._moments
        else:
            hidden = model(input_ids=inputs, use_cache=False).logits
            hidden = hidden[valid.to(hidden.device)]
            moments = _inplace_moments  # strided logit slices: keep the compiled graph simple
        targets = targets.to(hidden.device)
        return tiled_head_statistics(hidden, targets, head, with_distribution, *self._tile, moments)


def _input_device(model: torch.nn.Module, device: torch.device) -> torch.device:
    """Where a model's input ids go: its embeddings' device (the first GPU of a spread one)."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return device


def _fuse_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's tanh-GELU written as eight tensor ops (``NewGELUActivation``) for the same
    formula as one fused kernel; it agrees to float rounding and was a fifth of a GPT-2 pass."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


def _vocab_size(model: torch.nn.Module) -> int:
    """Token ids the model both embeds and predicts (its input and output embedding rows)."""
    sizes = [model.get_input_embeddings().num_embeddings]
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        sizes.append(head.out_features)
    return min(sizes)


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
