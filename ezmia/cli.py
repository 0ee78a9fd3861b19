"""The ``ezmia`` command line: ``audit``, ``report``, ``scan`` and ``demo``.

Every audit option is a field of ``AuditConfig``; flags are generated from it, so the CLI,
YAML configs and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import typing

from ezmia.config import AuditConfig, RayOptions, load_yaml, parse_model
from ezmia.errors import EzmiaError

AUDIT_HELP = {
    "target": "fine-tuned checkpoint to audit: local dir, s3:// prefix or hub id; a LoRA "
    "adapter dir (adapter_config.json) is scored on one copy of its base",
    "reference": "base model the target was fine-tuned from (default for adapters: the "
    "adapter's base)",
    "out": "output directory or s3:// prefix (scores/, summary.json, report.html, _SUCCESS)",
    "name": "name of the checkpoint in reports (default: the target's folder name)",
    "data": "Parquet file, directory or prefix to score (repeatable)",
    "members": "Parquet data known to be in the fine-tuning set (labels implied; repeatable)",
    "nonmembers": "Parquet data known NOT to be in the fine-tuning set (repeatable)",
    "calibration": "known non-members for detection mode on unlabelled --data (repeatable)",
    "text_column": "column holding the text",
    "id_column": "column holding a unique row id (default: the row's index in source order)",
    "label_column": "column with membership labels, bool or 0/1 (true = member)",
    "max_length": "tokens per sequence (longer texts are truncated and flagged)",
    "fpr": "false-positive rate of the detection threshold",
    "backend": "scoring backend: vllm (prompt logprobs), torch, or auto",
    "device": "torch device: auto, cpu, cuda, cuda:1 ...",
    "dtype": "auto = bf16 on GPU, fp32 on CPU",
    "batch_size": "sequences per forward pass",
    "engine": "local (this process) or ray (cluster); auto = ray when RAY_ADDRESS is set",
    "overwrite": "replace an output location that already holds a finished audit",
    "include_text": "copy raw texts into scores and report (off: private by default)",
    "allow_pickle": "allow pickle-based weights (.bin), which can run code when loaded",
    "trust_remote_code": "allow checkpoints that ship custom model code (auto_map)",
    "bootstrap_rounds": "bootstrap resamples for the 95%% intervals",
    "seed": "random seed of the bootstrap",
    "sse": "S3 server-side encryption for everything written",
    "sse_kms_key_id": "KMS key id for --sse aws:kms",
    "cache_dir": "where downloaded and merged models are cached (default ~/.cache/ezmia)",
}
RAY_FLAGS = {
    "address": "Ray cluster address (default: RAY_ADDRESS)",
    "min_actors": "fewest scoring actors",
    "max_actors": "most scoring actors",
    "gpus_per_actor": "GPUs per scoring actor (fractions allowed)",
    "cpus_per_actor": "CPUs per scoring actor",
}


def _add_model_flags(parser: argparse.ArgumentParser, model, helps: dict, prefix: str = "") -> None:
    for name, info in model.model_fields.items():
        if name not in helps:
            continue
        flag = "--" + (prefix + name).replace("_", "-")
        dest = prefix + name
        origin = typing.get_origin(info.annotation)
        if info.annotation is bool:
            parser.add_argument(
                flag, dest=dest, action="store_true", default=None, help=helps[name]
            )
        elif origin is list:
            parser.add_argument(flag, dest=dest, action="append", metavar="URI", help=helps[name])
        else:
            choices = typing.get_args(info.annotation) if origin is typing.Literal else None
            default = None if info.is_required() else info.default
            hint = f" (default: {default})" if default not in (None, [], False) else ""
            parser.add_argument(flag, dest=dest, choices=choices, help=helps[name] + hint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ezmia",
        description="Privacy audits of fine-tuned LLM checkpoints with EZ-MIA: how well can an "
        "attacker tell the fine-tuning texts from unseen ones? Higher scores = more member-like.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="score a dataset against a target and its reference; write scores and a report",
        description="Example: ezmia audit --target ft/ --reference base/ --data eval.parquet "
        "--label-column is_member --out audit/",
    )
    audit.add_argument("--config", help="YAML file with any of these options (flags override)")
    _add_model_flags(audit, AuditConfig, AUDIT_HELP)
    _add_model_flags(audit, RayOptions, RAY_FLAGS, prefix="ray_")
    batch = commands.add_parser(
        "batch",
        help="run many audits from one YAML (the org-wide Ray job); index them",
        description="Example: ezmia batch --config jobs/audit.example.yaml",
    )
    batch.add_argument("--config", required=True, help="YAML: out, defaults, audits")
    report = commands.add_parser("report", help="re-render report.html from an audit's scores")
    report.add_argument("out", help="an audit output directory or s3:// prefix")
    demo = commands.add_parser("demo", help="offline demo: full fine-tune vs LoRA, audited")
    demo.add_argument("--out", default="demo-out", help="where the demo writes its audits")
    demo.add_argument("--data-uri", help="stage the demo data and models here (e.g. s3://b/x)")
    scan = commands.add_parser(
        "scan",
        help="nightly scan: audit new or changed checkpoints under a registry prefix",
        description="Example: ezmia scan --registry s3://models/finetunes/ --out s3://audits/ "
        "--policy policy.yaml",
    )
    scan.add_argument("--registry", required=True, help="prefix holding checkpoint folders")
    scan.add_argument("--out", required=True, help="audit root: reports, index, ledger, alerts")
    scan.add_argument("--policy", help="YAML policy: thresholds, rules, audit defaults")
    scan.add_argument("--engine", choices=["auto", "local", "ray"], default="auto")
    return parser


def audit_config_from_args(args: argparse.Namespace) -> AuditConfig:
    """Merge ``--config`` YAML with the flags given (flags win) into an ``AuditConfig``."""
    data = load_yaml(args.config) if args.config else {}
    values = vars(args)
    for name in AuditConfig.model_fields:
        if values.get(name) is not None:
            data[name] = values[name]
    ray = dict(data.get("ray") or {})
    for name in RayOptions.model_fields:
        if values.get("ray_" + name) is not None:
            ray[name] = values["ray_" + name]
    if ray:
        data["ray"] = ray
    return parse_model(AuditConfig, data, args.config or "command line")


def run(args: argparse.Namespace) -> int:
    if args.command == "audit":
        from ezmia.audit import audit

        result = audit(audit_config_from_args(args))
        print(result.summary["verdict"]["text"])
        print(f"report: {result.out.rstrip('/')}/report.html")
        return 0
    if args.command == "batch":
        from ezmia.batch import run_batch

        return run_batch(args.config)
    if args.command == "report":
        from ezmia.report import rerender

        print(f"report: {rerender(args.out)}")
        return 0
    if args.command == "demo":
        from ezmia.demo.run import run_demo

        return run_demo(args.out, args.data_uri)
    from ezmia.scan import run_scan

    return run_scan(args.registry, args.out, args.policy, args.engine)


def _one_line(message: str) -> str:
    """Errors are one line on stderr, whatever a library put in them."""
    return " ".join(message.split())


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a stopped job cleans up as on Ctrl-C
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return run(args)
    except EzmiaError as err:
        print(f"ezmia: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        from ezmia.storage import describe_s3_error

        reason = describe_s3_error(err)  # an S3 failure no module mapped: still one line
        if reason is None:
            raise
        print(f"ezmia: error: S3: {_one_line(reason)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ezmia: interrupted; what this run wrote was removed (no _SUCCESS): rerun to finish",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
