"""The audit plan: models resolved and checked, datasets planned as fragments, rows checked
(ids, labels, members against non-members), and where the audit may write, all before any
output is touched or any model loads."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

from ezmia.config import AuditConfig
from ezmia.data import storage
from ezmia.data.datasets import (
    FILE_ROW,
    FRAGMENT,
    TEXT_DIGEST,
    Columns,
    Fragment,
    member_and_nonmember,
    plan_fragments,
    read_keys,
)
from ezmia.errors import InputError
from ezmia.plan.checks import check_vocabulary
from ezmia.plan.fetch import cache_root
from ezmia.plan.models import ModelPlan, context_length, plan_models
from ezmia.stats import blind
from ezmia.stats.metrics import min_nonmembers


@dataclass
class AuditPlan:
    """What an audit will read and load, checked before anything is written."""

    config: AuditConfig
    models: ModelPlan
    columns: Columns
    fragments: list[Fragment]
    calibration: list[Fragment]
    timings: dict[str, float] = field(default_factory=dict)
    blind_baseline: dict | None = None  # of a leakage audit's split, from its texts alone


class BlindSample:
    """Hashed text features and labels of the rows as they are read (a seeded sample of about
    ``blind.MAX_ROWS`` rows of a larger audit), for the blind baseline."""

    def __init__(self, total_rows: int, seed: int) -> None:
        self.keep = min(1.0, blind.MAX_ROWS / total_rows)
        self.draw = np.random.default_rng(seed)
        self.features: list[sparse.csr_matrix] = []
        self.labels: list[np.ndarray] = []

    def __call__(self, rows: pa.Table) -> None:
        if self.keep < 1:
            rows = rows.filter(pa.array(self.draw.random(rows.num_rows) < self.keep))
        self.features.append(blind.text_features(rows.column("text").to_pylist()))
        self.labels.append(rows.column("is_member").to_numpy(zero_copy_only=False).astype(bool))

    def baseline(self, bootstrap_rounds: int, seed: int) -> dict | None:
        features = sparse.vstack(self.features).tocsr()
        return blind.blind_baseline(features, np.concatenate(self.labels), bootstrap_rounds, seed)


def plan_audit(config: AuditConfig) -> AuditPlan:
    """Resolve models and datasets and refuse bad input, before touching the output."""
    started = time.perf_counter()
    models = plan_models(
        config.target,
        config.reference,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
        cache_dir=config.cache_dir,
        weights=not use_ray(config),  # a Ray driver plans; its actors fetch the weights
    )
    check_vocabulary(models)
    limit = context_length(models)
    if limit is not None and config.max_length > limit:
        raise InputError(
            f"--max-length {config.max_length} exceeds the model's context of {limit} tokens "
            f"({models.reference}/config.json); use --max-length {limit} or less"
        )
    columns = Columns(config.text_column, config.id_column, config.label_column)
    labels = [True] * len(config.members) + [False] * len(config.nonmembers)
    fragments = plan_fragments(config.datasets, columns, labels or None)
    calibration = plan_fragments(config.calibration, Columns(config.text_column))
    plan = AuditPlan(config, models, columns, fragments, calibration)
    check_rows(plan)
    plan.timings["plan_s"] = time.perf_counter() - started
    return plan


def check_rows(plan: AuditPlan) -> None:
    """Refuse empty datasets, null or duplicate ids, single-class labels and rows that are
    both a member and a non-member (the same id or the same text). Reads one fragment at a
    time and keeps ids, labels and text digests only, never texts."""
    sources = ", ".join(plan.config.datasets)
    if not sum(f.num_rows for f in plan.fragments):
        raise InputError(f"{sources}: the dataset has no rows; point --data at a non-empty one")
    calibration_rows = sum(f.num_rows for f in plan.calibration)
    if plan.config.calibration and calibration_rows < min_nonmembers(plan.config.fpr):
        raise InputError(
            f"--calibration {', '.join(plan.config.calibration)}: {calibration_rows} known "
            f"non-members cannot calibrate --fpr {plan.config.fpr:g}, which needs at least "
            f"{min_nonmembers(plan.config.fpr)}; add calibration rows or raise --fpr to "
            f"{1 / max(calibration_rows, 1):.2g} or more"
        )
    labelled = plan.config.is_labelled
    if not (plan.columns.id or labelled):
        return
    sample = BlindSample(sum(f.num_rows for f in plan.fragments), plan.config.seed)
    observe = sample if labelled else None  # the blind baseline reads texts in the same pass
    keys = read_keys(plan.fragments, plan.columns, digests=labelled, observe=observe)

    def where(index: int) -> str:
        fragment = plan.fragments[keys.column(FRAGMENT)[index].as_py()]
        return f"{fragment.uri} row {keys.column(FILE_ROW)[index].as_py()}"

    def both(rows: tuple[int, int]) -> str:
        return f"{where(rows[0])} (member) and {where(rows[1])} (non-member)"

    if plan.columns.id:
        ids = keys.column("id")
        if ids.null_count:
            row = ids.to_pylist().index(None)
            raise InputError(
                f"{where(row)}: id column {plan.columns.id!r} is null; give every row an id, or "
                "drop --id-column to number rows by position"
            )
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
        shared = member_and_nonmember(keys, "id") if labelled and len(repeated) else None
        if shared:
            raise InputError(
                f"{both(shared)} have the same id {ids[shared[0]].as_py()!r} (column "
                f"{plan.columns.id!r}); a row is either a member or a non-member: remove it "
                "from one side, or fix its label"
            )
        if len(repeated):
            first = repeated[0].as_py()
            rows = pc.indices_nonzero(pc.equal(ids, first["values"])).to_pylist()[:2]
            raise InputError(
                f"{where(rows[0])}: id column {plan.columns.id!r} has duplicates ("
                f"{first['values']!r} appears {first['counts']} times, again at "
                f"{where(rows[1])}); ids must be unique"
            )
    if labelled:
        members = int(pc.sum(keys.column("is_member")).as_py() or 0)
        if members in (0, keys.num_rows):
            kind = "non-members" if members == 0 else "members"
            raise InputError(
                f"{sources}: every row is one class (only {kind}); a leakage audit needs both "
                "members and non-members"
            )
        shared = member_and_nonmember(keys, TEXT_DIGEST)
        if shared:
            raise InputError(
                f"{both(shared)} hold the same text; a text is either a member or a "
                "non-member: remove it from one side, or fix its label"
            )
        plan.blind_baseline = sample.baseline(plan.config.bootstrap_rounds, plan.config.seed)


def input_locations(config: AuditConfig, models: ModelPlan | None = None) -> dict[str, list[str]]:
    """Every location an audit reads (by the flag that names it): ``--out`` may overlap none.
    Hub model ids are not locations; ``models`` adds the resolved model folders."""

    def located(uri: str | None) -> list[str]:
        if uri is None:
            return []
        local = Path(uri).expanduser().exists() or uri.startswith((".", "/", "~"))
        return [uri] if storage.is_s3(uri) or local else []

    found = {
        "--data": config.data,
        "--members": config.members,
        "--nonmembers": config.nonmembers,
        "--calibration": config.calibration,
        "--target": located(config.target),
        "--reference": located(config.reference),
        "--cache-dir (the model cache)": [str(cache_root(config.cache_dir))],
    }
    if models is not None:
        found["the models' files"] = [str(models.target), str(models.reference)]
    return found


def use_ray(config: AuditConfig) -> bool:
    """Ray when asked, or on ``auto`` when a cluster address is set or inside a Ray job. An
    http(s) ``RAY_ADDRESS`` is a job server's (``ray job submit``), not a cluster to join:
    ``auto`` scores locally then (``--ray-address http://...`` is refused when connecting)."""
    if config.engine != "auto":
        return config.engine == "ray"
    address = os.environ.get("RAY_ADDRESS", "")
    return bool(
        config.ray.address
        or os.environ.get("RAY_JOB_ID")
        or (address and not job_server_address(address))
    )


def job_server_address(address: str) -> bool:
    """Whether a Ray address is a job server's (http or https), not a cluster's."""
    return address.strip().lower().startswith(("http://", "https://"))
