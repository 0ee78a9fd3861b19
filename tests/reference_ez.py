"""An independent, deliberately naive implementation of the EZ score from
shared/EZMIA.md (full-vocabulary log-softmax per sequence, Python loops), used as an oracle."""

from __future__ import annotations

import torch


def naive_ez(target, reference, ids: list[int]) -> tuple[float, str]:
    """EZ score and status of one token-id sequence, straight from the definition."""
    if len(ids) == 0:
        return 0.0, "empty"
    if len(ids) < 3:
        return 0.0, "too_short"
    x = torch.tensor([ids])
    with torch.no_grad():
        lt = torch.log_softmax(target(x).logits[0].double(), dim=-1)
        lr = torch.log_softmax(reference(x).logits[0].double(), dim=-1)
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
