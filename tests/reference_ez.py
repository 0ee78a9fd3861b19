"""An independent, deliberately naive implementation of the EZ score from
shared/EZMIA.md (full-vocabulary log-softmax per sequence, Python loops), used as an oracle."""

from __future__ import annotations

import contextlib

import torch


def _log_probs(model, ids: list[int], base_only: bool = False) -> torch.Tensor:
    context = model.disable_adapter() if base_only else contextlib.nullcontext()
    with torch.no_grad(), context:
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def naive_ez(target, reference, ids: list[int], adapter: bool = False) -> tuple[float, str]:
    """EZ score and status of one token-id sequence, straight from the definition; with
    ``adapter`` the reference is ``target`` with its adapter disabled."""
    if len(ids) == 0:
        return 0.0, "empty"
    if len(ids) < 3:
        return 0.0, "too_short"
    lt = _log_probs(target, ids)
    lr = _log_probs(target, ids, base_only=True) if adapter else _log_probs(reference, ids)
    positive = negative = 0.0
    errors = 0
    for t in range(2, len(ids)):
        if int(lt[t - 1].argmax()) == ids[t]:
            continue
        errors += 1
        delta = float(lt[t - 1, ids[t]] - lr[t - 1, ids[t]])
        if delta > 0:
            positive += delta
        else:
            negative -= delta
    if errors < 2:
        return 0.0, "too_few_errors"
    if negative == 0:
        return 0.0, "no_negative_shift"
    return positive / negative, "ok"
