"""The nightly scan: audit every new or changed checkpoint under a registry prefix.

For each checkpoint (sorted by name): unchanged (audited before at this fingerprint) ->
recorded as such, its earlier metrics judged against today's thresholds; no audit data (no
``ezmia.yaml`` sidecar, no policy rule) -> skipped with the reason; otherwise it is locked,
audited with ``ezmia.audit.audit``, indexed, judged against the policy and recorded in the
ledger before its lock is released. An audit whose verdict is "insufficient" (too few scored
rows) is a failed audit, not a pass. A failing audit never stops the scan. Exit code 1 when
any checkpoint fails its audit or the policy, unchanged ones included.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from ezmia.config import AuditConfig, parse_model
from ezmia.data import outputs, storage
from ezmia.data.locks import LockHeld, Locks
from ezmia.data.schema import LEDGER_SCHEMA, LEDGER_STATUSES, SCHEMA_VERSION
from ezmia.errors import EzmiaError, InputError, one_line
from ezmia.fleet.index import dataset_label, index_row, report_location, today, write_index
from ezmia.fleet.ledger import Ledger
from ezmia.fleet.policy import Policy, Thresholds, judge, load_policy, read_options
from ezmia.fleet.registry import SIDECAR, Checkpoint, discover
from ezmia.report.model import Summary
from ezmia.stats.metrics import METRICS

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """One scan run: its id, date, policy and the ledger and locks it writes."""

    scan_id: str
    date: str
    out: str
    policy: Policy
    engine: str
    encryption: storage.Encryption
    ledger: Ledger
    locks: Locks


def start_scan(out: str, policy: Policy, engine: str) -> Scan:
    now = dt.datetime.now(dt.timezone.utc)
    stamp = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z"  # ids sort by start time
    scan_id, date = f"{stamp}-{uuid.uuid4().hex[:8]}", today()
    defaults = policy.audit_defaults
    encryption = storage.Encryption(defaults.sse, defaults.sse_kms_key_id)
    return Scan(
        scan_id=scan_id,
        date=date,
        out=out,
        policy=policy,
        engine=engine,
        encryption=encryption,
        ledger=Ledger(out, scan_id, date, encryption),
        locks=Locks(out, {"scan_id": scan_id}, policy.lock_ttl_hours * 3600, encryption),
    )


def ledger_row(scan: Scan, ckpt: Checkpoint, status: str, **fields) -> dict:
    return dict.fromkeys(LEDGER_SCHEMA.names) | {
        "scan_id": scan.scan_id,
        "scanned_at": dt.datetime.now(dt.timezone.utc),
        "checkpoint": ckpt.name,
        "checkpoint_uri": ckpt.uri,
        "kind": ckpt.kind,
        "fingerprint": ckpt.fingerprint,
        "status": status,
        "schema_version": SCHEMA_VERSION,
        **fields,
    }


def carried_over(previous: dict, thresholds: Thresholds) -> dict:
    """The report and metrics of an earlier audit, for an unchanged checkpoint, judged again
    against today's thresholds (the policy may have changed since)."""
    keys = ("report_uri", "verdict", "leakage", *(f"ez_{metric}" for metric in METRICS))
    row = {k: previous[k] for k in keys} | {"reason": f"audited by scan {previous['scan_id']}"}
    if previous["ez_auc"] is None:
        return row  # no leakage metrics to judge again: the earlier verdict stands
    summary_uri = storage.join(previous["report_uri"].rsplit("/", 1)[0], outputs.SUMMARY)
    try:
        summary = Summary.model_validate(json.loads(storage.read_bytes(summary_uri)))
    except (OSError, ValueError, EzmiaError) as err:  # ValueError: pydantic's too
        reason = f"{summary_uri}: the earlier audit's summary is unreadable ({describe(err)})"
        return row | {"verdict": "fail", "reason": f"{row['reason']}; {reason}"}
    judgement = judge(summary, thresholds)
    reason = "; ".join([row["reason"], *judgement.breaches])
    return row | {"verdict": judgement.verdict, "reason": reason}


def audit_config(scan: Scan, ckpt: Checkpoint) -> AuditConfig | None:
    """Defaults, matching rules, then the sidecar; ``None`` when neither sidecar nor rule."""
    rules = scan.policy.rule_options(ckpt.name)
    sidecar = read_options(ckpt.sidecar) if ckpt.sidecar else None
    if rules is None and sidecar is None:
        return None
    options = scan.policy.audit_defaults.model_dump(exclude_unset=True) | (rules or {})
    options |= sidecar or {}
    if scan.engine != "auto":
        options["engine"] = scan.engine
    location = report_location(scan.out, f"{ckpt.name}-{ckpt.fingerprint[:8]}", scan.date)
    options.update(target=ckpt.uri, out=location, name=ckpt.name, overwrite=True)
    return parse_model(AuditConfig, options, ckpt.sidecar or f"policy rules for {ckpt.name}")


def run_audit(scan: Scan, ckpt: Checkpoint, config: AuditConfig) -> dict:
    """Audit, index and judge one checkpoint; an error becomes a ``failed`` row."""
    from ezmia.audit import audit

    started = time.perf_counter()
    try:
        result = audit(config)
        write_index(scan.out, [index_row(result, dataset_label(config))], scan.encryption,
                    scan.date)  # fmt: skip
    except Exception as err:  # any error: record it, keep scanning
        log.exception("%s: audit failed", ckpt.name)
        return ledger_row(scan, ckpt, "failed", reason=describe(err),
                          duration_s=time.perf_counter() - started)  # fmt: skip
    judgement = judge(result.summary, scan.policy.thresholds_for(ckpt.name))
    ez = result.summary.metrics.get("ez_score")
    level = result.summary.verdict.level
    return ledger_row(
        scan,
        ckpt,
        "failed" if level == "insufficient" else "audited",
        reason="; ".join(judgement.breaches) or None,
        report_uri=storage.join(result.out, outputs.REPORT),
        verdict=judgement.verdict,
        leakage=level,
        **{f"ez_{metric}": getattr(ez, metric) if ez else None for metric in METRICS},
        duration_s=time.perf_counter() - started,
    )


def lock_key(ckpt: Checkpoint) -> str:
    """The lock name of a checkpoint at its current fingerprint."""
    return hashlib.sha256(f"{ckpt.uri}\n{ckpt.fingerprint}".encode()).hexdigest()[:32]


def describe(err: Exception) -> str:
    """An error as one line; ezmia's own errors need no type name."""
    text = one_line(err)
    return text if isinstance(err, EzmiaError) else f"{type(err).__name__}: {text}"


def unchanged(scan: Scan, ckpt: Checkpoint) -> dict | None:
    """An ``unchanged`` row when some scan already audited this checkpoint as it is now."""
    previous = scan.ledger.audited.get((ckpt.uri, ckpt.fingerprint))
    if previous is None:
        return None
    thresholds = scan.policy.thresholds_for(ckpt.name)
    return ledger_row(scan, ckpt, "unchanged", **carried_over(previous, thresholds))


def scan_checkpoint(scan: Scan, ckpt: Checkpoint) -> tuple[dict, bool]:
    """The ledger row of one checkpoint, and whether it is already written."""
    if row := unchanged(scan, ckpt):
        return row, False
    try:
        config = audit_config(scan, ckpt)
    except Exception as err:  # a bad sidecar or rule fails this checkpoint only
        return ledger_row(scan, ckpt, "failed", reason=describe(err)), False
    if config is None:
        reason = (f"no audit data: add {ckpt.uri}/{SIDECAR} or a policy rule matching "
                  f"{ckpt.name!r}")  # fmt: skip
        return ledger_row(scan, ckpt, "skipped", reason=reason), False
    try:
        lock = scan.locks.acquire(lock_key(ckpt), checkpoint=ckpt.uri)
    except LockHeld as held:
        return ledger_row(scan, ckpt, "skipped", reason=str(held)), False
    with scan.locks.held(lock):  # renewed while the audit runs, released after
        scan.ledger.refresh()  # a scan that held the lock before us may have finished it
        if row := unchanged(scan, ckpt):
            return row, False
        row = run_audit(scan, ckpt, config)
        scan.ledger.append([row])
        return row, True


def is_failure(row: dict) -> bool:
    """A failed audit (an error, or too few scored rows), or a checkpoint over the policy's
    thresholds, audited by this scan or unchanged since a failing audit."""
    return row["status"] == "failed" or (
        row["status"] in ("audited", "unchanged") and row["verdict"] == "fail"
    )


def write_alerts(scan: Scan, rows: list[dict]) -> str | None:
    """``OUT/alerts/date=.../alerts-<scan_id>.json`` (JSON Lines), only when something failed."""
    failures = [r for r in rows if is_failure(r)]
    if not failures:
        return None
    uri = storage.join(scan.out, "alerts", f"date={scan.date}", f"alerts-{scan.scan_id}.json")
    lines = [json.dumps(r, default=lambda v: v.isoformat()) for r in failures]
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode(), scan.encryption)
    return uri


def print_summary(scan: Scan, rows: list[dict], alerts: str | None) -> None:
    """One line per checkpoint: status, verdict, name, report and/or reason."""
    totals = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in LEDGER_STATUSES)
    print(f"ezmia scan {scan.scan_id}: {len(rows)} checkpoints ({totals})")
    for r in rows:
        reason = f"({r['reason']})" if r.get("reason") else None
        detail = " ".join(filter(None, [r.get("report_uri"), reason]))
        print(f"  {r['status']:<9} {r.get('verdict') or '-':<4} {r['checkpoint']}  {detail}")
    if alerts:
        print(f"alerts: {alerts}")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while scanning, so the current lock is released."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_scan(registry: str, out: str, policy_path: str | None, engine: str) -> int:
    """Scan ``registry``, write ledger, index, reports and alerts under ``out``; exit code."""
    scan = start_scan(out, load_policy(policy_path), engine)
    checkpoints = discover(registry)
    if not checkpoints:
        raise InputError(
            f"{registry}: no checkpoints found (folders with config.json and *.safetensors, "
            "or adapter_config.json); check --registry"
        )
    scan.ledger.refresh()
    rows, pending = [], []
    with sigterm_as_exit():
        for number, ckpt in enumerate(checkpoints, 1):
            row, written = scan_checkpoint(scan, ckpt)
            print(f"[{number}/{len(checkpoints)}] {row['status']} {ckpt.name}", file=sys.stderr)
            rows.append(row)
            if not written:
                pending.append(row)
        scan.ledger.append(pending)
    alerts = write_alerts(scan, rows)
    print_summary(scan, rows, alerts)
    return 1 if any(is_failure(r) for r in rows) else 0
