"""The configuration models on their own: one-line errors that name the source, every bad key
(with its flag and the value given) and a suggestion for a typo; the cross-field rules and the
bounds of each option; the properties derived from a config; YAML read locally and from S3."""

from __future__ import annotations

import functools
import math

import pytest
from pydantic import ValidationError

from ezmia.config import (
    AuditConfig,
    RayOptions,
    VllmOptions,
    load_yaml,
    option_group,
    parse_model,
)
from ezmia.data.storage import Encryption
from ezmia.errors import EzmiaError, InputError

SOURCE = "audits/nightly.yaml: audit #2 (ckpt-7)"
MINIMAL = {"target": "s3://models/ckpt-7/", "out": "/tmp/audit-out", "data": ["eval.parquet"]}
TINY = math.nextafter(0.0, 1.0)  # the smallest float above 0
BELOW_ONE = math.nextafter(1.0, 0.0)
ABOVE_ONE = math.nextafter(1.0, 2.0)


def config(**changes: object) -> AuditConfig:
    return AuditConfig.model_validate({**MINIMAL, **changes})


def with_option(path: str, value: object) -> dict:
    """``MINIMAL`` with ``path`` (``fpr`` or ``ray.max_actors``) set to ``value``."""
    group, _, name = path.rpartition(".")
    return {**MINIMAL, group: {name: value}} if group else {**MINIMAL, name: value}


def refused(values: dict, model: type = AuditConfig) -> str:
    """The problem ``parse_model`` reports for ``values``: checked to be one line that starts
    with the source, raised as an ``InputError``; returned without the source."""
    with pytest.raises(InputError) as caught:
        parse_model(model, values, SOURCE)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(f"{SOURCE}: "), line
    return line.removeprefix(f"{SOURCE}: ")


# --- parse_model: what a bad key's line says


def test_a_valid_mapping_is_parsed_with_the_strings_of_flags_converted():
    parsed = parse_model(
        AuditConfig,
        {**MINIMAL, "max_length": "64", "overwrite": "true", "ray": {"max_actors": "3"}},
        SOURCE,
    )
    assert isinstance(parsed, AuditConfig)
    assert (parsed.max_length, parsed.overwrite, parsed.ray.max_actors) == (64, True, 3)


def test_a_parse_error_is_an_input_error_raised_from_pydantics():
    with pytest.raises(InputError) as caught:
        parse_model(AuditConfig, {**MINIMAL, "fpr": 2}, SOURCE)
    assert isinstance(caught.value, EzmiaError)  # reported as one line, exit code 2
    assert isinstance(caught.value.__cause__, ValidationError)


def test_a_bad_value_is_named_by_its_key_and_flag_with_the_value_given():
    assert refused({**MINIMAL, "max_length": 1}) == (
        "max_length (--max-length): Input should be greater than or equal to 2 (got 1)"
    )


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"ray": {"max_actors": 0}},
         "ray.max_actors (--ray-max-actors): Input should be greater than or equal to 1 (got 0)"),
        ({"vllm": {"gpu_memory_utilization": 1.5}},
         "vllm.gpu_memory_utilization (--vllm-gpu-memory-utilization): Input should be less "
         "than or equal to 1 (got 1.5)"),
    ],
    ids=["ray", "vllm"],
)  # fmt: skip
def test_a_nested_option_is_named_by_its_dotted_key_and_its_groups_flag(values, problem):
    assert refused({**MINIMAL, **values}) == problem


def test_the_options_of_other_models_are_named_without_a_flag():
    from ezmia.fleet.batch import BatchConfig  # its ``out`` is not ``ezmia audit --out``

    assert refused({"out": "", "audits": [{}]}, BatchConfig) == (
        "out: String should have at least 1 character (got '')"
    )
    assert refused({"max_actors": 0}, RayOptions) == (
        "max_actors: Input should be greater than or equal to 1 (got 0)"
    )


@pytest.mark.parametrize(
    ("values", "start", "given"),
    [
        ({"fpr": "often"}, "fpr (--fpr): Input should be a valid number", "(got 'often')"),
        ({"backend": "gpu"}, "backend (--backend): Input should be 'auto', 'torch' or 'vllm'",
         "(got 'gpu')"),
        ({"data": "eval.parquet"}, "data (--data): Input should be a valid list",
         "(got 'eval.parquet')"),
        ({"delta": 1.5}, "delta (--delta): Input should be less than 1", "(got 1.5)"),
    ],
    ids=["text-for-a-number", "unknown-choice", "text-for-a-list", "float"],
)  # fmt: skip
def test_the_value_given_is_shown_as_python_would_write_it(values, start, given):
    problem = refused({**MINIMAL, **values})
    assert problem.startswith(start), problem
    assert problem.endswith(given), problem


def test_a_missing_key_is_named_without_a_value():
    assert refused({"out": "o", "data": ["d"]}) == "target (--target): Field required"


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"max_lenght": 32}, "max_lenght: unknown key; did you mean 'max_length'?"),
        ({"ray": {"max_actor": 2}}, "ray.max_actor: unknown key; did you mean 'max_actors'?"),
        ({"vllm": {"gpu_memory_utilisation": 0.5}},
         "vllm.gpu_memory_utilisation: unknown key; did you mean 'gpu_memory_utilization'?"),
    ],
    ids=["top-level", "ray", "vllm"],
)  # fmt: skip
def test_a_typoed_key_gets_a_did_you_mean_suggestion(values, problem):
    assert refused({**MINIMAL, **values}) == problem


@pytest.mark.parametrize(
    ("values", "key", "model"),
    [
        ({"colour": "blue"}, "colour", AuditConfig),
        ({"ray": {"workers": 2}}, "ray.workers", RayOptions),
        ({"vllm": {"quantization": "awq"}}, "vllm.quantization", VllmOptions),
    ],
    ids=["top-level", "ray", "vllm"],
)
def test_an_unknown_key_with_nothing_close_lists_the_known_keys(values, key, model):
    known = ", ".join(model.model_fields)
    assert refused({**MINIMAL, **values}) == f"{key}: unknown key; known keys: {known}"


def test_an_unknown_key_inside_a_list_of_models_lists_that_models_keys():
    from ezmia.fleet.policy import Policy

    problem = refused({"overrides": [{"match": "prod/*", "colour": "blue"}]}, Policy)
    assert problem.startswith("overrides.0.colour: unknown key; known keys: match, "), problem


def test_every_problem_is_reported_in_the_one_line():
    problem = refused(
        {
            "out": "o",
            "data": ["d"],
            "fpr": 2,
            "max_lenght": 32,
            "ray": {"min_actors": 0},
            "vllm": {"lora_mode": "adapter"},
        }
    )
    expected = [
        "target (--target): Field required",
        "fpr (--fpr): Input should be less than 1 (got 2)",
        "ray.min_actors (--ray-min-actors): Input should be greater than or equal to 1 (got 0)",
        "vllm.lora_mode (--vllm-lora-mode): Input should be 'merge' or 'lora_request' "
        "(got 'adapter')",
        "max_lenght: unknown key; did you mean 'max_length'?",
    ]
    for part in expected:
        assert part in problem, problem
    assert len(problem) == len("; ".join(expected)), problem


# --- the rules between fields, and the bounds of each option

RULES = [
    ("no-dataset", {"data": []},
     "no dataset: give --data (or --members and --nonmembers)"),
    ("members-without-nonmembers", {"data": [], "members": ["m.parquet"]},
     "--members and --nonmembers go together: give both, or --data with --label-column"),
    ("nonmembers-without-members", {"data": [], "nonmembers": ["n.parquet"]},
     "--members and --nonmembers go together: give both, or --data with --label-column"),
    ("data-with-members", {"members": ["m.parquet"], "nonmembers": ["n.parquet"]},
     "give either --data or --members/--nonmembers, not both"),
    ("calibration-with-a-label-column", {"label_column": "is_member", "calibration": ["c"]},
     "--calibration is for unlabelled --data (detection); this audit has labels "
     "(--label-column or --members): drop one or the other"),
    ("calibration-with-members",
     {"data": [], "members": ["m.parquet"], "nonmembers": ["n.parquet"], "calibration": ["c"]},
     "--calibration is for unlabelled --data (detection); this audit has labels "
     "(--label-column or --members): drop one or the other"),
    ("kms-key-without-sse", {"sse_kms_key_id": "alias/audits"},
     "--sse-kms-key-id needs --sse aws:kms"),
    ("kms-key-with-aes256", {"sse": "AES256", "sse_kms_key_id": "alias/audits"},
     "--sse-kms-key-id needs --sse aws:kms"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "problem"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_a_cross_field_rule_is_refused_with_its_own_message(values, problem):
    assert refused({**MINIMAL, **values}) == problem


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"label_column": "is_member"},
        {"data": [], "members": ["m.parquet"], "nonmembers": ["n.parquet"]},
        {"calibration": ["c.parquet"]},
        {"sse": "aws:kms", "sse_kms_key_id": "alias/audits"},
        {"sse": "aws:kms"},
    ],
    ids=["data", "data-with-labels", "members", "data-with-calibration", "kms-key", "kms"],
)
def test_the_combinations_the_rules_allow_are_accepted(values):
    assert isinstance(parse_model(AuditConfig, {**MINIMAL, **values}, SOURCE), AuditConfig)


def test_ray_pools_may_be_fixed_but_not_shrink_below_their_minimum():
    assert RayOptions(min_actors=3, max_actors=3).max_actors == 3
    message = "--ray-max-actors 2 is below --ray-min-actors 3"
    assert refused({"min_actors": 3, "max_actors": 2}, RayOptions) == message
    assert refused({**MINIMAL, "ray": {"min_actors": 3, "max_actors": 2}}) == f"ray: {message}"


def test_an_item_of_a_list_option_is_named_with_its_lists_flag():
    problem = refused({**MINIMAL, "data": ["a.parquet", 7]})
    assert problem == "data.1 (--data): Input should be a valid string (got 7)"


BOUNDS = [  # option, the last value allowed, the first one refused, what the refusal says
    ("max_length", 2, 1, "greater than or equal to 2"),
    ("batch_size", 1, 0, "greater than or equal to 1"),
    ("bootstrap_rounds", 0, -1, "greater than or equal to 0"),
    ("fpr", TINY, 0.0, "greater than 0"),
    ("fpr", BELOW_ONE, 1.0, "less than 1"),
    ("delta", TINY, 0.0, "greater than 0"),
    ("delta", BELOW_ONE, 1.0, "less than 1"),
    ("claimed_epsilon", TINY, 0.0, "greater than 0"),
    ("ray.min_actors", 1, 0, "greater than or equal to 1"),
    ("ray.max_actors", 1, 0, "greater than or equal to 1"),
    ("ray.gpus_per_actor", 0.0, -TINY, "greater than or equal to 0"),
    ("ray.cpus_per_actor", TINY, 0.0, "greater than 0"),
    ("ray.rows_per_block", 1, 0, "greater than or equal to 1"),
    ("vllm.gpu_memory_utilization", TINY, 0.0, "greater than 0"),
    ("vllm.gpu_memory_utilization", 1.0, ABOVE_ONE, "less than or equal to 1"),
    ("vllm.max_num_seqs", 1, 0, "greater than or equal to 1"),
    ("vllm.canary_sequences", 0, -1, "greater than or equal to 0"),
    ("vllm.tensor_parallel_size", 1, 0, "greater than or equal to 1"),
    ("vllm.reference_tensor_parallel_size", 1, 0, "greater than or equal to 1"),
]


@pytest.mark.parametrize(
    ("path", "allowed", "past", "bound"), BOUNDS, ids=[f"{b[0]}-{b[1]!r}" for b in BOUNDS]
)
def test_an_option_takes_its_bound_and_refuses_the_value_just_past_it(path, allowed, past, bound):
    parsed = parse_model(AuditConfig, with_option(path, allowed), SOURCE)
    assert functools.reduce(getattr, path.split("."), parsed) == allowed
    flag = "--" + path.replace(".", "-").replace("_", "-")
    assert refused(with_option(path, past)) == (
        f"{path} ({flag}): Input should be {bound} (got {past!r})"
    )


# --- what a config derives


@pytest.mark.parametrize(
    ("values", "mode", "labelled"),
    [
        ({"label_column": "is_member"}, "leakage", True),
        ({"data": [], "members": ["m.parquet"], "nonmembers": ["n.parquet"]}, "leakage", True),
        ({"calibration": ["c.parquet"]}, "detection", False),
        ({}, "scores", False),
    ],
    ids=["label-column", "members", "calibration", "unlabelled"],
)
def test_the_mode_follows_the_labels_and_calibration_given(values, mode, labelled):
    parsed = config(**values)
    assert (parsed.mode, parsed.is_labelled) == (mode, labelled)


@pytest.mark.parametrize(
    ("values", "datasets"),
    [
        ({"data": ["a.parquet", "b/"]}, ["a.parquet", "b/"]),
        ({"data": [], "members": ["m1", "m2"], "nonmembers": ["n1"]}, ["m1", "m2", "n1"]),
    ],
    ids=["data", "members-then-nonmembers"],
)
def test_the_datasets_are_the_data_or_the_member_then_the_nonmember_files(values, datasets):
    assert config(**values).datasets == datasets


@pytest.mark.parametrize(
    ("target", "name", "shown"),
    [
        ("s3://models/ckpt-7/", None, "ckpt-7"),
        ("/ckpts/run-3/final//", None, "final"),
        ("/ckpts/run-3/final", None, "final"),
        ("org/model", None, "model"),
        ("s3://models/ckpt-7/", "prod-7", "prod-7"),
    ],
    ids=["s3-prefix-with-slash", "trailing-slashes", "folder", "hub-id", "explicit-name"],
)
def test_the_display_name_is_the_name_given_or_the_targets_folder(target, name, shown):
    assert config(target=target, name=name).display_name == shown


@pytest.mark.parametrize(
    ("values", "encryption"),
    [
        ({}, Encryption(None, None)),
        ({"sse": "AES256"}, Encryption("AES256", None)),
        ({"sse": "aws:kms"}, Encryption("aws:kms", None)),
        (
            {"sse": "aws:kms", "sse_kms_key_id": "alias/audits"},
            Encryption("aws:kms", "alias/audits"),
        ),
    ],
    ids=["none", "aes256", "kms-default-key", "kms-key"],
)
def test_the_encryption_carries_the_sse_options(values, encryption):
    assert config(**values).encryption == encryption


@pytest.mark.parametrize(
    ("reference", "sizes"), [(None, (4, 4)), (2, (4, 2))], ids=["shared", "reference-own"]
)
def test_each_vllm_stage_is_sharded_over_its_own_tensor_parallel_size(reference, sizes):
    vllm = VllmOptions(tensor_parallel_size=4, reference_tensor_parallel_size=reference)
    assert tuple(vllm.stage_tensor_parallel_size(r) for r in ("target", "reference")) == sizes


@pytest.mark.parametrize(
    ("group", "key"), [("", "fpr"), ("ray", "max_actors"), ("vllm", "max_num_seqs")]
)
def test_a_config_is_frozen(group, key):
    parsed = config(label_column="is_member")
    options = getattr(parsed, group) if group else parsed
    before = getattr(options, key)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(options, key, 0.5)
    assert getattr(options, key) == before


@pytest.mark.parametrize("model", [AuditConfig, RayOptions, VllmOptions])
def test_unknown_keys_are_forbidden(model):
    with pytest.raises(ValidationError) as caught:
        model.model_validate({**(MINIMAL if model is AuditConfig else {}), "colour": "blue"})
    assert [(e["type"], e["loc"]) for e in caught.value.errors()] == [
        ("extra_forbidden", ("colour",))
    ]


def test_option_group_is_the_model_of_a_group_field_only():
    fields = AuditConfig.model_fields
    assert option_group(fields["ray"]) is RayOptions
    assert option_group(fields["vllm"]) is VllmOptions
    assert option_group(fields["target"]) is None
    assert option_group(fields["sse"]) is None
    assert option_group(None) is None


# --- load_yaml


def test_load_yaml_returns_the_mapping_of_a_local_file(tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("target: org/model\nray:\n  max_actors: 2\ndata: [a.parquet, b.parquet]\n")
    assert load_yaml(str(path)) == {
        "target": "org/model",
        "ray": {"max_actors": 2},
        "data": ["a.parquet", "b.parquet"],
    }


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "config file not found"),
        (b"target: [unclosed\n", "unreadable config (while parsing a flow sequence)"),
        (b"target: ok\n\tout: tab\n", "unreadable config (while scanning for the next token)"),
        (b"target: caf\xe9\n",
         "unreadable config (unacceptable character #x00e9: invalid continuation byte)"),
        (b"- target: x\n", "expected a YAML mapping at the top level"),
        (b"just some text\n", "expected a YAML mapping at the top level"),
        (b"", "expected a YAML mapping at the top level"),
    ],
    ids=["missing", "unclosed", "tab", "not-utf8", "a-list", "a-scalar", "empty"],
)  # fmt: skip
def test_load_yaml_refuses_a_bad_file_in_one_line_naming_it(tmp_path, content, problem):
    path = tmp_path / "audit.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_yaml(str(path))
    assert str(caught.value) == f"{path}: {problem}"


def test_load_yaml_reads_an_s3_object_and_names_a_missing_one(s3, bucket):
    s3.client().put_object(Bucket=bucket, Key="configs/audit.yaml", Body=b"target: org/model\n")
    assert load_yaml(f"s3://{bucket}/configs/audit.yaml") == {"target": "org/model"}
    missing = f"s3://{bucket}/configs/nope.yaml"
    with pytest.raises(InputError) as caught:
        load_yaml(missing)
    assert str(caught.value) == f"{missing}: config file not found"
