"""Typed audit configuration: one model shared by the CLI, the Ray jobs and the nightly scan.

Unknown keys are errors, so a typo in a YAML file never goes unnoticed.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from ezmia.data.storage import Encryption, read_bytes
from ezmia.errors import InputError, first_line
from ezmia.stats.epsilon import DELTA


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayOptions(Strict):
    """How the Ray engine sizes its model stages' actor pools (one pool per model stage)."""

    address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS)")
    min_actors: int = Field(1, ge=1, description="fewest actors per model stage")
    max_actors: int = Field(1, ge=1, description="most actors per model stage")
    gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs per model-stage actor (fractions allowed; default: the stage's "
        "tensor-parallel size on a cluster with GPUs, else 0)",
    )
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per model-stage actor")
    rows_per_block: int = Field(256, ge=1, description="rows per Ray Data block and batch")

    @model_validator(mode="after")
    def _pool_bounds(self) -> RayOptions:
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"--ray-max-actors {self.max_actors} is below --ray-min-actors {self.min_actors}"
            )
        return self


class VllmOptions(Strict):
    """vLLM engine settings (used when the backend is vLLM)."""

    gpu_memory_utilization: float = Field(
        0.8, gt=0, le=1, description="share of GPU memory vLLM may take"
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences per vLLM step")
    max_model_len: int | None = Field(
        None, description="vLLM context length (default: --max-length)"
    )
    lora_mode: Literal["merge", "lora_request"] = Field(
        "merge", description="LoRA targets: merge the adapter, or serve it per request"
    )
    canary_sequences: int = Field(
        8, ge=0, description="sequences scored by both vLLM and PyTorch to cross-check vLLM"
    )
    on_canary_failure: Literal["stop", "fallback"] = Field(
        "fallback", description="when vLLM disagrees with PyTorch: stop, or fall back to PyTorch"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs the target's vLLM engine is sharded over (Ray: per actor)"
    )
    reference_tensor_parallel_size: int | None = Field(
        None,
        ge=1,
        description="GPUs the reference's vLLM engine is sharded over (default: the target's)",
    )

    def stage_tensor_parallel_size(self, role: str) -> int:
        """GPUs one vLLM engine of a model stage (``role``) is sharded over."""
        reference = self.reference_tensor_parallel_size if role == "reference" else None
        return reference or self.tensor_parallel_size


class AuditConfig(Strict):
    """Everything one audit needs. Datasets: ``data`` (with ``label_column`` for a leakage
    audit), or ``members`` and ``nonmembers`` files whose labels are implied;
    ``calibration`` (known non-members) turns an unlabelled audit into detection."""

    target: str = Field(
        description="fine-tuned checkpoint to audit: local dir, s3:// prefix or hub id; a LoRA "
        "adapter dir (adapter_config.json) is scored on one copy of its base"
    )
    reference: str | None = Field(
        None,
        description="base model the target was fine-tuned from (default for adapters: the "
        "adapter's base)",
    )
    out: str = Field(
        description="output directory or s3:// prefix (scores/, summary.json, report.html, "
        "_SUCCESS); must be empty, new, or an earlier ezmia audit"
    )
    name: str | None = Field(
        None, description="name of the checkpoint in reports (default: the target's folder name)"
    )
    data: list[str] = Field([], description="Parquet file, directory or prefix to score")
    members: list[str] = Field(
        [], description="Parquet data known to be in the fine-tuning set (labels implied)"
    )
    nonmembers: list[str] = Field(
        [], description="Parquet data known NOT to be in the fine-tuning set"
    )
    calibration: list[str] = Field(
        [], description="known non-members for detection mode on unlabelled --data"
    )
    text_column: str = Field("text", description="column holding the text")
    id_column: str | None = Field(
        None, description="column holding a unique row id (default: the row's index in order)"
    )
    label_column: str | None = Field(
        None, description="column with membership labels, bool or 0/1 (true = member)"
    )
    max_length: int = Field(
        128, ge=2, description="tokens per sequence (longer texts are truncated and flagged)"
    )
    fpr: float = Field(
        0.001, gt=0, lt=1, description="false-positive rate of the detection threshold"
    )
    backend: Literal["auto", "torch", "vllm"] = Field(
        "auto", description="scoring backend: vllm (prompt logprobs), torch, or auto"
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="most sequences per forward pass (PyTorch cuts a batch short where its "
        "padding would cost more than another pass)",
    )
    engine: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="local (this process) or ray (cluster); auto = ray with --ray-address, "
        "inside a Ray job, or when RAY_ADDRESS is a cluster's address (a job server's http "
        "address scores locally)",
    )
    overwrite: bool = Field(
        False, description="replace an earlier finished ezmia audit at --out (only its files)"
    )
    include_text: bool = Field(
        False, description="copy raw texts into scores and report (off: private by default)"
    )
    allow_pickle: bool = Field(
        False, description="allow pickle-based weights (.bin), which can run code when loaded"
    )
    trust_remote_code: bool = Field(
        False, description="allow checkpoints that ship custom model code (auto_map)"
    )
    bootstrap_rounds: int = Field(
        200, ge=0, description="bootstrap resamples for the 95% intervals"
    )
    claimed_epsilon: float | None = Field(
        None,
        gt=0,
        description="epsilon claimed for a model trained with differential privacy: the audit "
        "says whether its data refute it",
    )
    delta: float = Field(DELTA, gt=0, lt=1, description="delta of the empirical epsilon bound")
    seed: int = Field(0, description="random seed of the bootstrap")
    sse: Literal["aws:kms", "AES256"] | None = Field(
        None, description="S3 server-side encryption for everything written"
    )
    sse_kms_key_id: str | None = Field(None, description="KMS key id for --sse aws:kms")
    cache_dir: str | None = Field(
        None, description="where downloaded and merged models are cached (default ~/.cache/ezmia)"
    )
    ray: RayOptions = Field(RayOptions(), description="Ray engine options")
    vllm: VllmOptions = Field(VllmOptions(), description="vLLM backend options")

    @model_validator(mode="after")
    def _datasets_given(self) -> AuditConfig:
        if not (self.data or self.members or self.nonmembers):
            raise ValueError("no dataset: give --data (or --members and --nonmembers)")
        if bool(self.members) != bool(self.nonmembers):
            raise ValueError(
                "--members and --nonmembers go together: give both, or --data with --label-column"
            )
        if self.data and self.members:
            raise ValueError("give either --data or --members/--nonmembers, not both")
        if self.calibration and self.is_labelled:
            raise ValueError(
                "--calibration is for unlabelled --data (detection); this audit has labels "
                "(--label-column or --members): drop one or the other"
            )
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("--sse-kms-key-id needs --sse aws:kms")
        return self

    @property
    def datasets(self) -> list[str]:
        """The data scored: ``--data``, or the member then the non-member files."""
        return [*self.data, *self.members, *self.nonmembers]  # the validator allows one kind

    @property
    def is_labelled(self) -> bool:
        return bool(self.label_column or self.members)

    @property
    def mode(self) -> str:
        """``leakage`` (labels known), ``detection`` (calibration given) or ``scores``."""
        if self.is_labelled:
            return "leakage"
        return "detection" if self.calibration else "scores"

    @property
    def display_name(self) -> str:
        return self.name or Path(self.target).name

    @property
    def encryption(self) -> Encryption:
        """The S3 server-side encryption of everything this audit writes."""
        return Encryption(self.sse, self.sse_kms_key_id)


def parse_model(model: type[Strict], data: dict, source: str) -> Strict:
    """Validate a dict into ``model``; errors name the source, every bad key (with its
    ``--flag`` for audit options and a suggestion for typos) and the value given."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(_problem(model, e) for e in err.errors())
        raise InputError(f"{source}: {problems}") from err


def _problem(model: type[Strict], error: dict) -> str:
    """One validation error as ``key (--flag): what is wrong (got value)``."""
    loc = [str(p) for p in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:
        return message
    key = ".".join(loc)
    names = [part for part in loc if not part.isdigit()]  # list items share their list's flag
    option = _fields_at(model, names[:-1]).get(names[-1]) if model is AuditConfig else None
    if option is not None and option_group(option) is None:
        key += f" (--{'-'.join(names).replace('_', '-')})"
    if error["type"] == "extra_forbidden":
        known = list(_fields_at(model, loc[:-1]))
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return f"{'.'.join(loc)}: unknown key; {hint}"
    if error["type"] != "missing" and isinstance(error.get("input"), (str, int, float)):
        message += f" (got {error['input']!r})"
    return f"{key}: {message}"


def option_group(field: FieldInfo | None) -> type[BaseModel] | None:
    """The option group a field holds (``ray``, ``vllm``), if it is one."""
    return _model(field.annotation if field else None)


def _model(kind: object) -> type[BaseModel] | None:
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _fields_at(model: type[BaseModel], path: list[str]) -> dict:
    """The fields of the (nested) model at ``path``, where a number is an item of a list of
    models; empty when there is none."""
    for part in path:
        if part.isdigit():
            continue  # the list's item model was taken at the list's own field
        kind = field.annotation if (field := model.model_fields.get(part)) else None
        items = typing.get_args(kind) if typing.get_origin(kind) is list else (kind,)
        model = _model(items[0] if items else None)
        if model is None:
            return {}
    return model.model_fields


def load_yaml(path: str) -> dict:
    """A YAML mapping from a local file or S3 object, with a clear error if unreadable."""
    try:
        data = yaml.safe_load(read_bytes(path))
    except FileNotFoundError as err:
        raise InputError(f"{path}: config file not found") from err
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable config ({first_line(err)})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a YAML mapping at the top level")
    return data
