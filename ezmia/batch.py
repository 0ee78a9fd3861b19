"""Many audits in one run (the org-wide Ray job): one YAML, one report per checkpoint under
``OUT/date=YYYY-MM-DD/checkpoint=<name>/`` and one index row per audit under ``OUT/index/``."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pydantic import Field

from ezmia import index
from ezmia.audit import audit
from ezmia.config import AuditConfig, Strict, load_yaml, parse_model
from ezmia.errors import EzmiaError, InputError

log = logging.getLogger(__name__)


class BatchConfig(Strict):
    """``out``: the audit root; ``defaults``: options every audit gets; ``audits``: one entry
    per checkpoint (any ``AuditConfig`` option; ``name`` names its report folder)."""

    out: str = Field(min_length=1, pattern=r"\S")
    defaults: dict[str, Any] = {}
    audits: list[dict[str, Any]] = Field(min_length=1)
    date: dt.date | None = None


def merge(defaults: dict, entry: dict) -> dict:
    """``entry`` over ``defaults``, merging nested option groups (``ray``, ``vllm``)."""
    merged = dict(defaults)
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def plan_batch(path: str) -> tuple[BatchConfig, list[AuditConfig]]:
    """Validate the whole file (every audit) before the first audit starts."""
    batch = parse_model(BatchConfig, load_yaml(path), path)
    configs: list[AuditConfig] = []
    names: dict[str, str] = {}
    for number, entry in enumerate(batch.audits, start=1):
        values = merge(batch.defaults, entry)
        name = values.get("name") or str(values.get("target", "")).rstrip("/").rsplit("/", 1)[-1]
        folder = index.safe_name(name)
        if not name or folder in names:
            raise InputError(
                f"{path}: audit #{number} needs a unique name (got {name!r}, whose report "
                f"folder checkpoint={folder} another audit already uses); set `name:`"
            )
        names[folder] = name
        date = batch.date.isoformat() if batch.date else None
        values.update(name=name, out=index.report_location(batch.out, name, date))
        configs.append(parse_model(AuditConfig, values, f"{path}: audit #{number} ({name})"))
    return batch, configs


def run_batch(path: str) -> int:
    """Run every audit of the file; one failure does not stop the others. Exit code 1 when
    any audit failed."""
    batch, configs = plan_batch(path)
    rows, failures = [], []
    for config in configs:
        try:
            result = audit(config)
        except EzmiaError as err:
            failures.append(config.display_name)
            print(f"FAILED {config.display_name}: {err}")
            continue
        rows.append(index.index_row(result, index.dataset_label(config)))
        print(f"{result.summary['verdict']['level']:>8} {config.display_name}: {config.out}")
    written = index.write_index(batch.out, rows)
    print(f"{len(rows)} audits indexed in {written}; {len(failures)} failed")
    return 1 if failures else 0
