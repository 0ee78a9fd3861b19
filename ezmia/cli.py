"""The ``ezmia`` command line: ``audit``, ``report``, ``scan`` and ``demo``.

Every audit option is a field of ``AuditConfig``; flags are generated from it, so the CLI,
YAML configs and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
import typing

from pydantic import BaseModel

from ezmia.config import AuditConfig, load_yaml, option_group, parse_model
from ezmia.errors import EzmiaError, Interrupted, one_line


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], prefix="") -> None:
    """One flag per field of ``model`` (groups flattened as ``--ray-...``), help and
    defaults from the field itself; booleans as ``--x/--no-x`` so a YAML value can be
    switched either way."""
    for name, info in model.model_fields.items():
        if group := option_group(info):
            _add_model_flags(parser, group, f"{prefix}{name}_")
            continue
        dest = prefix + name
        flag = "--" + dest.replace("_", "-")
        text = (info.description or "").replace("%", "%%")
        if info.annotation is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif typing.get_origin(info.annotation) is list:
            parser.add_argument(
                flag, dest=dest, action="append", metavar="URI", help=text + " (repeatable)"
            )
        else:
            kinds = [info.annotation, *typing.get_args(info.annotation)]
            literal = next((a for a in kinds if typing.get_origin(a) is typing.Literal), None)
            choices = typing.get_args(literal) if literal else None
            default = None if info.is_required() else info.default
            hint = "" if default is None or default is False else f" (default: {default})"
            parser.add_argument(flag, dest=dest, choices=choices, help=text + hint)


def _flag_values(values: dict, model: type[BaseModel], data: dict, prefix: str = "") -> dict:
    """``data`` (from YAML) with every flag given on the command line put over it."""
    merged = dict(data)
    for name, info in model.model_fields.items():
        if group := option_group(info):
            nested = _flag_values(values, group, dict(data.get(name) or {}), f"{prefix}{name}_")
            if nested:
                merged[name] = nested
        elif values.get(prefix + name) is not None:
            merged[name] = values[prefix + name]
    return merged


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
    _add_model_flags(audit, AuditConfig)
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
    return parse_model(
        AuditConfig, _flag_values(vars(args), AuditConfig, data), args.config or "command line"
    )


def run(args: argparse.Namespace) -> int:
    if args.command == "audit":
        from ezmia.audit import audit

        result = audit(audit_config_from_args(args))
        print(result.summary.verdict.text)
        print(f"report: {result.out.rstrip('/')}/report.html")
        return 0
    if args.command == "batch":
        from ezmia.fleet.batch import run_batch

        return run_batch(args.config)
    if args.command == "report":
        from ezmia.report.publish import rerender

        print(f"report: {rerender(args.out)}")
        return 0
    if args.command == "demo":
        from ezmia.demo.run import run_demo

        return run_demo(args.out, args.data_uri)
    from ezmia.fleet.scan import run_scan

    return run_scan(args.registry, args.out, args.policy, args.engine)


def _interrupt(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):  # a stopped job cleans up as on Ctrl-C
            signal.signal(signum, _interrupt)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return run(args)
    except EzmiaError as err:
        message = str(err)
    except Exception as err:
        from ezmia.data.storage import describe_s3_error

        reason = describe_s3_error(err)  # an S3 failure no module mapped: still one line
        if reason is None:
            raise
        message = f"S3: {reason}"
    except KeyboardInterrupt:
        print(
            "ezmia: interrupted; what this run wrote was removed (no _SUCCESS): rerun to finish",
            file=sys.stderr,
        )
        return 130
    print(f"ezmia: error: {one_line(message)}", file=sys.stderr)  # one line, always
    return 2


def command(argv: list[str] | None = None) -> int:
    """``main`` as a process runs it (the ``ezmia`` command, ``python -m ezmia``, the Ray job
    scripts), then exit without the collector's last pass over every object torch and
    transformers created: ``gc.freeze`` saves about a second per run; the memory goes back to
    the operating system with the process."""
    code = main(argv)
    gc.freeze()
    return code


if __name__ == "__main__":  # python -m ezmia.cli, as python -m ezmia
    sys.exit(command())
