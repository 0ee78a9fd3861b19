"""The scan policy (``policy.yaml``): leakage thresholds with per-prefix overrides, audit
defaults, and rules that give checkpoints their audit data; and the pass/fail verdict.

Rules, overrides and sidecars are matched on a checkpoint's name (its folder relative to the
registry, e.g. ``team-a/ckpt-7``) with shell globs (``*`` also crosses ``/``). Every matching
entry applies in file order, later ones winning key by key. A path value starting with
``./`` or ``../`` is relative to the folder of the file that names it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import get_origin

from pydantic import Field, create_model, field_validator

from ezmia.config import AuditConfig, Strict, load_yaml, parse_model
from ezmia.data import storage
from ezmia.errors import InputError
from ezmia.report.model import SummaryData
from ezmia.report.summary import VERDICT_RULES, exceeds
from ezmia.stats.metrics import METRICS

SET_BY_SCAN = ("target", "out", "name", "overwrite")
# Safety and privacy switches, encryption and where the audit runs or writes: only the
# operator (the policy's audit_defaults and rules, the scan's flags) may set these; a sidecar
# that names one is refused. "ray.address" is the key ``address`` of the ``ray`` group.
OPERATOR_ONLY = ("trust_remote_code", "allow_pickle", "include_text", "cache_dir", "sse",
                 "sse_kms_key_id", "engine", "ray.address")  # fmt: skip
PATH_KEYS = ("members", "nonmembers", "data", "calibration", "reference")

LIST_KEYS = [n for n, f in AuditConfig.model_fields.items() if get_origin(f.annotation) is list]


def _one_or_many(value):
    """``members: a.parquet`` means ``members: [a.parquet]``."""
    return [value] if isinstance(value, str) else value


AuditOptions = create_model(  # every AuditConfig field the scan does not set, all optional
    "AuditOptions",
    __base__=Strict,
    __doc__="Audit settings from a sidecar, a policy rule or the policy's audit defaults.",
    __validators__={"one_or_many": field_validator(*LIST_KEYS, mode="before")(_one_or_many)},
    **{
        name: (info.annotation | None, None)
        for name, info in AuditConfig.model_fields.items()
        if name not in SET_BY_SCAN
    },
)


HIGH = {key: limit for level, key, limit in VERDICT_RULES if level == "high"}


LIMITS = {f"max_{m}": (float | None, Field(HIGH.get(m), ge=0, le=1)) for m in METRICS}
"""A ``max_<metric>`` field per metric (``None``: no limit), defaulting to the verdict's
"high" limit."""


Thresholds = create_model(
    "Thresholds",
    __base__=Strict,
    __doc__="""Largest metric values a checkpoint may show and still pass, for the score
    ``score`` (a score column, or ``any``: every score must stay within them). The defaults are
    the verdict's "high" limits on EZ: by default a checkpoint fails exactly when EZ's verdict
    level is high (or the audit is insufficient).""",
    score=(str, "ez_score"),
    **LIMITS,
)

Override = create_model(
    "Override",
    __base__=Strict,
    __doc__="Thresholds for the checkpoints whose name matches ``match``.",
    match=(str, ...),
    score=(str | None, None),
    **{name: (kind, Field(None, ge=0, le=1)) for name, (kind, _) in LIMITS.items()},
)


class Rule(AuditOptions):  # type: ignore[misc,valid-type]
    """Audit data and settings for the checkpoints whose name matches ``match``."""

    match: str


class Policy(Strict):
    thresholds: Thresholds = Thresholds()  # type: ignore[valid-type]
    overrides: list[Override] = []  # type: ignore[valid-type]
    audit_defaults: AuditOptions = AuditOptions()  # type: ignore[valid-type]
    rules: list[Rule] = []
    lock_ttl_hours: float = Field(6.0, gt=0)

    def thresholds_for(self, name: str) -> Thresholds:
        """Global thresholds with every matching override applied in order."""
        values = self.thresholds.model_dump()
        for override in self.overrides:
            if fnmatchcase(name, override.match):
                values.update(override.model_dump(exclude={"match"}, exclude_unset=True))
        return Thresholds(**values)

    def rule_options(self, name: str) -> dict | None:
        """The merged options of every rule matching ``name``; ``None`` when none does."""
        matching = [r for r in self.rules if fnmatchcase(name, r.match)]
        if not matching:
            return None
        merged: dict = {}
        for rule in matching:
            merged.update(rule.model_dump(exclude={"match"}, exclude_unset=True))
        return merged


def resolve_paths(options: dict, folder: str) -> dict:
    """``./``- and ``../``-relative path values made relative to ``folder`` instead."""

    def resolve(value: str) -> str:
        if not value.startswith(("./", "../")):
            return value
        if storage.is_s3(folder):
            bucket, key = storage.split_s3(folder)
            return f"s3://{bucket}/{posixpath.normpath(posixpath.join(key, value))}"
        return str((Path(folder) / value).resolve())

    resolved = dict(options)
    for key in PATH_KEYS:
        value = resolved.get(key)
        if isinstance(value, str):
            resolved[key] = resolve(value)
        elif isinstance(value, list):
            resolved[key] = [resolve(v) if isinstance(v, str) else v for v in value]
    return resolved


def operator_only_keys(options: dict) -> list[str]:
    """The ``OPERATOR_ONLY`` keys that ``options`` (a sidecar's raw mapping) sets."""
    found = []
    for key in OPERATOR_ONLY:
        group, _, name = key.rpartition(".")
        values = options.get(group) if group else options
        if isinstance(values, dict) and name in values:
            found.append(key)
    return found


def read_options(uri: str) -> dict:
    """A sidecar's audit options, validated (typos and operator-only keys fail) and with
    relative paths resolved."""
    data = load_yaml(uri)
    if refused := operator_only_keys(data):
        them = "it" if len(refused) == 1 else "them"
        raise InputError(
            f"{uri}: {', '.join(refused)}: a checkpoint's sidecar may not set {them}, only the "
            f"operator's policy (audit_defaults or rules) or the scan's flags may; remove "
            f"{them} from the sidecar"
        )
    folder = uri.rsplit("/", 1)[0]
    options = parse_model(AuditOptions, resolve_paths(data, folder), uri)
    return options.model_dump(exclude_unset=True)


def load_policy(path: str | None) -> Policy:
    """The policy at ``path`` (relative paths in it resolved), or the default policy."""
    if path is None:
        return Policy()
    data = load_yaml(path)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    if isinstance(data.get("audit_defaults"), dict):
        data["audit_defaults"] = resolve_paths(data["audit_defaults"], folder)
    if isinstance(data.get("rules"), list):
        data["rules"] = [resolve_paths(r, folder) if isinstance(r, dict) else r
                         for r in data["rules"]]  # fmt: skip
    return parse_model(Policy, data, path)  # type: ignore[return-value]


@dataclass(frozen=True)
class Judgement:
    verdict: str  # "pass" or "fail"
    breaches: list[str]


def judge(summary: SummaryData, thresholds: Thresholds) -> Judgement:
    """Pass when every limited metric of the policy's score (or of every score, for ``any``)
    is within its limit (the verdict's boundary rule, ``exceeds``). A TPR at a rate the
    non-members cannot resolve is judged by its upper bound, the TPR at the lowest rate they
    do resolve: it passes only when that bound is within the limit. Fails without labelled
    metrics or with too few scored rows."""
    if summary.verdict.level == "insufficient":
        return Judgement("fail", [f"insufficient: {summary.verdict.text}"])
    metrics = summary.metrics
    if "ez_score" not in metrics:
        return Judgement(
            "fail",
            [f"no EZ leakage metrics (mode {summary.mode}): the policy needs "
             "members and nonmembers"],
        )  # fmt: skip
    names = list(metrics) if thresholds.score == "any" else [thresholds.score]
    if thresholds.score != "any" and thresholds.score not in metrics:
        skipped = summary.metrics_skipped.get(thresholds.score, "not a score")
        return Judgement("fail", [f"score {thresholds.score!r} was not measured ({skipped})"])
    breaches = []
    for name in names:
        label = "EZ" if name == "ez_score" else name
        for metric in METRICS:
            limit = getattr(thresholds, f"max_{metric}")
            value = metrics[name].bounded(metric)
            if limit is None or not exceeds(value, limit):
                continue
            unresolved = metrics[name].unresolved.get(metric)
            if unresolved:
                breaches.append(
                    f"{label} {metric} cannot be measured with {metrics[name].n_nonmembers} "
                    f"non-members (needs {unresolved.needs_nonmembers}) and its bound, the "
                    f"TPR at FPR {unresolved.upper_bound_at_fpr:.2%}, is {value:.4f} > "
                    f"max_{metric} {limit:g}: add non-members or lift the limit"
                )
            else:
                breaches.append(f"{label} {metric} {value:.4f} > max_{metric} {limit:g}")
    return Judgement("fail" if breaches else "pass", breaches)
