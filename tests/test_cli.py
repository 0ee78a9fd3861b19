"""The command line is generated from the configuration models: every option has a flag with
help, booleans switch both ways, and flags override a YAML config key by key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from pydantic import BaseModel

from ezmia.cli import audit_config_from_args, build_parser
from ezmia.config import AuditConfig
from tests.conftest import REPO


def option_flags(model: type[BaseModel], prefix: str = "") -> dict[str, str | None]:
    """Every leaf option of ``model`` as its flag, with its description."""
    flags: dict[str, str | None] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            flags.update(option_flags(kind, f"{prefix}{name}-"))
        else:
            flags["--" + (prefix + name).replace("_", "-")] = info.description
    return flags


def audit_help(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["audit", "--help"])
    return "".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


def test_audit_help_lists_every_option_with_its_help(capsys):
    text = audit_help(capsys)
    flags = option_flags(AuditConfig)
    assert {"--vllm-max-num-seqs", "--ray-rows-per-block", "--sse-kms-key-id"} <= set(flags)
    for flag, description in flags.items():
        assert description, f"{flag} has no description"
        assert flag in text
        assert "".join(description.split()) in text, flag


def test_boolean_flags_switch_a_yaml_true_off_and_a_yaml_false_on(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text(json.dumps({"target": "t", "out": "o", "data": ["d"], "include_text": True}))
    base = ["audit", "--config", str(config)]
    parse = build_parser().parse_args
    assert audit_config_from_args(parse(base)).include_text is True
    assert audit_config_from_args(parse([*base, "--no-include-text"])).include_text is False
    assert audit_config_from_args(parse([*base, "--overwrite"])).overwrite is True


def test_nested_flags_override_yaml_keys_of_their_group_one_by_one(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text(
        json.dumps(
            {
                "target": "t",
                "out": "o",
                "data": ["d"],
                "ray": {"max_actors": 4, "cpus_per_actor": 2},
                "vllm": {"max_num_seqs": 8},
            }
        )
    )
    args = build_parser().parse_args(
        [
            "audit",
            "--config",
            str(config),
            "--ray-cpus-per-actor",
            "1",
            "--vllm-lora-mode",
            "lora_request",
        ]  # fmt: skip
    )
    parsed = audit_config_from_args(args)
    assert (parsed.ray.max_actors, parsed.ray.cpus_per_actor) == (4, 1.0)
    assert (parsed.vllm.max_num_seqs, parsed.vllm.lora_mode) == (8, "lora_request")


def test_the_command_returns_mains_exit_code_with_the_collector_frozen_for_exit(tmp_path, capsys):
    import gc

    from ezmia.cli import command

    try:
        assert command(["report", str(tmp_path / "missing")]) == 2
        assert gc.get_freeze_count() > 0  # the objects of the run are left to the process exit
    finally:
        gc.unfreeze()
    assert capsys.readouterr().err.startswith(f"ezmia: error: {tmp_path / 'missing'}: ")


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_inside_an_exec_of_a_string_still_exits_130_under_python_m(tmp_path, name):
    """CPython ends ``python -m`` with SIGINT once a plain ``KeyboardInterrupt`` escaped an
    ``exec`` of a string, even a handled one; dataclasses are built that way, so a job stopped
    while transformers was importing died by SIGINT instead of exiting 130."""
    signum = int(getattr(signal, name))
    (tmp_path / "stopped_run.py").write_text(
        "import sys\n"
        "from ezmia import cli\n"
        f"cli.run = lambda args: exec('import os; os.kill(os.getpid(), {signum})')\n"
        "sys.exit(cli.command(['report', 'unused']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "stopped_run"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines()[-1].startswith("ezmia: interrupted;")
