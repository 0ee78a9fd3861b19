"""Finding checkpoints under a registry prefix (local directory or ``s3://``).

A folder holding ``config.json`` and ``*.safetensors`` is a full checkpoint; a folder holding
``adapter_config.json`` is a LoRA adapter. Its fingerprint hashes the names and ETags (S3)
or sizes and modification times (local) of its weight files and its config, so replacing
the weights changes it and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ezmia.data import storage
from ezmia.plan.fetch import PICKLE_WEIGHTS, SAFE_WEIGHTS

SIDECAR = "ezmia.yaml"
CONFIGS = ("config.json", "adapter_config.json")


@dataclass(frozen=True)
class Checkpoint:
    uri: str
    name: str  # the folder relative to the registry, e.g. "team-a/ckpt-7"
    kind: str  # "full" or "lora"
    fingerprint: str
    sidecar: str | None


def list_objects(prefix: str) -> dict[str, str]:
    """Every file under ``prefix`` with a change tag: S3 ETag, or local size and mtime."""
    if storage.is_s3(prefix):
        bucket, key = storage.split_s3(prefix.rstrip("/") + "/")
        objects = storage.s3_objects(bucket, key)
        return {f"s3://{bucket}/{obj['Key']}": obj["ETag"].strip('"') for obj in objects}
    found = {}
    for folder, _, names in os.walk(prefix):
        for name in names:
            stat = Path(folder, name).stat()
            found[str(Path(folder, name))] = f"{stat.st_size}-{stat.st_mtime_ns}"
    return found


def checkpoint_kind(names: set[str]) -> str | None:
    if "adapter_config.json" in names:
        return "lora"
    if "config.json" in names and any(fnmatchcase(n, "*.safetensors") for n in names):
        return "full"
    return None


def fingerprint(files: dict[str, str]) -> str:
    """Hash of the weight and config files' names and change tags."""
    patterns = (*SAFE_WEIGHTS, *PICKLE_WEIGHTS, *CONFIGS)
    kept = sorted((n, t) for n, t in files.items() if any(fnmatchcase(n, p) for p in patterns))
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:32]


def discover(registry: str) -> list[Checkpoint]:
    """Every checkpoint folder under ``registry``, sorted by name."""
    root = registry.rstrip("/") if storage.is_s3(registry) else str(Path(registry).resolve())
    folders: dict[str, dict[str, str]] = {}
    for uri, tag in list_objects(root).items():
        folder, name = uri.rsplit("/", 1)
        folders.setdefault(folder, {})[name] = tag
    found = []
    for folder, files in folders.items():
        kind = checkpoint_kind(set(files))
        if kind is None:
            continue
        name = folder[len(root) :].strip("/") or root.rsplit("/", 1)[-1]
        sidecar = f"{folder}/{SIDECAR}" if SIDECAR in files else None
        found.append(Checkpoint(folder, name, kind, fingerprint(files), sidecar))
    return sorted(found, key=lambda c: c.name)
