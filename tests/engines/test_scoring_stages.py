"""The stages of scoring (``ezmia.engines.scoring``), each run on its own with the real tiny
models: which stages an audit has and which models each resolves (a reference stage never
fetches the target's weights), the columns and backend names a model stage adds, the score
stage's scores schema (also for no rows), ``flagged`` added after scoring, and the backend
record the summary shows."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.backends.base import stats_from_columns
from ezmia.config import AuditConfig
from ezmia.data import storage
from ezmia.data.datasets import ROW_INDEX
from ezmia.data.schema import scores_schema
from ezmia.data.text import load_tokenizer
from ezmia.engines.pipeline import SLICE, _write_parts
from ezmia.engines.scoring import (
    PASS_TYPES,
    ModelStage,
    add_flagged,
    combined_choice,
    list_arrays,
    model_stages,
    run_pass,
    score_rows,
    stage_models,
    tokenize_rows,
)
from ezmia.errors import ModelError
from ezmia.plan.models import plan_models
from ezmia.stats.scores import score_sequence
from tests.conftest import upload_dir

TEXTS = ["Return the number of items.", "x", "", "Return the"]
"""A sentence, a 1-token and an empty text (no positions), and a 2-token one."""

TORCH = {"name": "torch", "reason": "PyTorch backend requested"}


def config_for(models, tmp_path, **changes) -> AuditConfig:
    settings = {
        "target": str(models.full),
        "reference": str(models.base),
        "out": str(tmp_path / "out"),
        "data": [str(models.eval)],
        "backend": "torch",
        "device": "cpu",
        **changes,
    }
    return AuditConfig(**settings)


@pytest.fixture(scope="module")
def plan(models):
    return plan_models(str(models.full), str(models.base))


@pytest.fixture(scope="module")
def stages(models, plan, tmp_path_factory):
    """The target's and the reference's stages of a full fine-tune, on the plan's models."""
    config = config_for(models, tmp_path_factory.mktemp("stages"))
    opened = [ModelStage(config, role, plan) for role in ("target", "reference")]
    yield opened
    for stage in opened:
        stage.close()


def tokenized(models, texts: list[str] = TEXTS, labelled: bool = True) -> pa.Table:
    rows = {
        "id": pa.array([f"doc-{i}" for i in range(len(texts))], pa.string()),
        "text": pa.array(texts, pa.string()),
        ROW_INDEX: pa.array(range(7, 7 + len(texts)), pa.int64()),
    }
    if labelled:
        rows["is_member"] = pa.array([i % 2 == 0 for i in range(len(texts))], pa.bool_())
    return tokenize_rows(pa.table(rows), load_tokenizer(models.tokenizer), max_length=16)


def test_an_adapter_has_one_model_stage_and_a_full_fine_tune_two():
    assert model_stages(target_is_adapter=True) == ["both"]
    assert model_stages(target_is_adapter=False) == ["target", "reference"]


def test_an_adapters_stage_resolves_the_adapter_and_the_base_it_names(models, tmp_path):
    config = config_for(models, tmp_path, target=str(models.lora), reference=None)
    planned = plan_models(str(models.lora), None)
    named = json.loads((models.lora / "adapter_config.json").read_text())
    assert planned.sources["reference"] == named["base_model_name_or_path"]
    assert stage_models(config, planned, "both") == planned
    assert stage_models(config, planned, "both").reference == Path(named["base_model_name_or_path"])


@pytest.mark.parametrize("role", ["target", "reference"])
def test_each_stage_of_a_local_fine_tune_resolves_the_planned_directories(models, tmp_path, role):
    config = config_for(models, tmp_path, cache_dir=str(tmp_path / "cache"))
    planned = plan_models(str(models.full), str(models.base), cache_dir=tmp_path / "cache")
    assert stage_models(config, planned, role) == planned


def test_a_stage_keeps_the_drivers_fingerprints_instead_of_planning_again(models, plan, tmp_path):
    """Fingerprints are the driver's (no weight file is hashed on an actor's node)."""
    planned = dataclasses.replace(plan, fingerprints={"target": "driver", "reference": "driver"})
    config = config_for(models, tmp_path)
    assert stage_models(config, planned, "reference").fingerprints == planned.fingerprints


def test_a_stage_refuses_a_checkpoint_that_turned_unsafe_after_planning(models, tmp_path):
    """The files a stage loads pass the driver's safety checks again: a target whose weights
    became pickle-only, or whose config now declares custom code, since it was planned."""
    target = shutil.copytree(models.full, tmp_path / "target")
    planned = plan_models(str(target), str(models.base))
    config = config_for(models, tmp_path, target=str(target))
    config_file = target / "config.json"
    declared = {**json.loads(config_file.read_text()), "auto_map": {"AutoModel": "x.Model"}}
    config_file.write_text(json.dumps(declared))
    with pytest.raises(ModelError, match="declares custom code"):
        stage_models(config, planned, "target")
    assert stage_models(config, planned, "reference").reference == planned.reference
    for weights in target.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelError, match="only pickle-based weights"):
        stage_models(config, planned, "target")
    trusting = config_for(models, tmp_path, target=str(target), allow_pickle=True,
                          trust_remote_code=True)  # fmt: skip
    assert stage_models(trusting, planned, "target").target == target  # the operator's choice


def test_each_stage_fetches_only_its_own_models_weights_into_the_configured_cache(
    s3, models, tmp_path
):
    """The driver plans both S3 models from their small files and headers; a stage then
    fetches the weights of its own model only (a reference stage never downloads the
    target) and the tokenizer's small files."""
    bucket = s3.make_bucket("stage-models")
    client = s3.client()
    uris = {
        "target": upload_dir(client, models.full, bucket, "full"),
        "reference": upload_dir(client, models.base, bucket, "base"),
    }
    cache = tmp_path / "cache"
    planned = plan_models(uris["target"], uris["reference"], cache_dir=cache, weights=False)
    assert planned.sources == {**uris, "tokenizer": uris["target"]}
    for role, other in (("reference", "target"), ("target", "reference")):
        config = config_for(models, tmp_path, **uris, cache_dir=str(cache))
        resolved = dataclasses.asdict(stage_models(config, planned, role))
        assert resolved[role].parent == cache / "models", role
        assert [p.name for p in resolved[role].glob("*.safetensors")] == ["model.safetensors"]
        assert resolved[other] == getattr(planned, other), role
        assert list(resolved[other].glob("*.safetensors")) == [], role
        assert resolved["tokenizer"].parent == cache / "tokenizers", role
        assert resolved["target_is_adapter"] is False


def test_a_stage_given_the_planned_models_loads_them_without_resolving_the_config_again(
    models, plan, tmp_path, caplog
):
    """The local engine hands its stages the plan's models: the config's paths are not read
    again (here the target's is gone)."""
    config = config_for(models, tmp_path, target=str(tmp_path / "gone"))
    with caplog.at_level(logging.INFO, logger="ezmia.engines.scoring"):
        stage = ModelStage(config, "target", plan)
    try:
        assert (stage.role, stage.choice) == ("target", TORCH)
        logged = [r.getMessage() for r in caplog.records if r.name == "ezmia.engines.scoring"]
        assert logged == [f"target stage backend: {TORCH}"]
        added = stage(tokenized(models)).column_names[-5:]
        assert added == ["lp_target", "target_top1", "mu", "sigma", "backend"]
    finally:
        stage.close()


def test_a_reference_stage_runs_only_the_reference_pass(models, plan, tmp_path):
    stage = ModelStage(config_for(models, tmp_path), "reference", plan)
    try:
        assert stage.role == "reference"
        assert stage(tokenized(models)).column_names[-2:] == ["lp_reference", "backend"]
    finally:
        stage.close()


def test_target_then_reference_passes_add_typed_columns_and_one_backend_name(models, stages):
    target, reference = stages
    rows = tokenized(models)
    after_target = target(rows)
    assert after_target.column_names == [
        *rows.column_names, "lp_target", "target_top1", "mu", "sigma", "backend"
    ]  # fmt: skip
    staged = reference(after_target)
    assert staged.column_names == [*after_target.column_names[:-1], "lp_reference", "backend"]
    for name, kind in PASS_TYPES.items():
        assert staged.schema.field(name).type == kind, name
    assert staged.schema.field("backend").type == pa.string()
    assert staged.column("backend").to_pylist() == ["torch"] * len(TEXTS)
    n_tokens = [len(ids) for ids in rows.column("input_ids").to_pylist()]
    positions = [max(n - 1, 0) for n in n_tokens]
    for name in PASS_TYPES:
        assert [len(v) for v in staged.column(name).to_pylist()] == positions, name


def test_a_pass_over_rows_another_backend_started_records_both_names(models, stages):
    """A row's ``backend`` names every distinct backend its passes ran on, in stage order."""
    rows = tokenized(models, TEXTS[:2])
    rows = rows.append_column("backend", pa.array(["vllm", "torch"], pa.string()))
    assert stages[1](rows).column("backend").to_pylist() == ["vllm+torch", "torch"]


def test_passes_over_no_rows_keep_the_column_types(models, stages):
    staged = stages[1](stages[0](tokenized(models, [])))
    assert staged.num_rows == 0
    for name, kind in [*PASS_TYPES.items(), ("backend", pa.string())]:
        assert staged.schema.field(name).type == kind, name


def test_a_pass_refuses_ids_outside_the_models_vocabulary(models, stages):
    rows = tokenized(models)
    vocab_size = stages[0].backend.vocab_size
    ids = rows.column("input_ids").to_pylist()
    ids[2] = [vocab_size]
    rows = rows.set_column(
        rows.column_names.index("input_ids"), "input_ids", pa.array(ids, pa.list_(pa.int32()))
    )
    with pytest.raises(ModelError, match=f"^source row 9: token id {vocab_size} is outside"):
        run_pass(rows, stages[0].backend)


def test_list_arrays_gives_each_rows_values_across_chunks_and_slices():
    values = pa.array([[1.5, 2.5], [], [3.5], [4.5, 5.5, 6.5]], pa.list_(pa.float64()))
    flags = pa.array([[True], [False, True], []], pa.list_(pa.bool_()))
    column = pa.chunked_array([values.slice(1), values.slice(0, 2)])
    got = list_arrays(column)
    assert [a.tolist() for a in got] == [[], [3.5], [4.5, 5.5, 6.5], [1.5, 2.5], []]
    assert {a.dtype for a in got} == {np.dtype(np.float64)}
    bools = list_arrays(pa.chunked_array([flags]))
    assert [a.tolist() for a in bools] == [[True], [False, True], []]
    assert bools[1].dtype == np.dtype(bool)


@pytest.mark.parametrize("include_text", [True, False])
def test_the_score_stage_writes_the_scores_schema_with_every_rows_scores(
    models, stages, include_text
):
    staged = stages[1](stages[0](tokenized(models)))
    scores = score_rows(staged, include_text=include_text)
    assert scores.schema.equals(
        scores_schema(pa.string(), True, False, include_text), check_metadata=True
    )
    got = scores.to_pylist()
    assert [r["id"] for r in got] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert [r["source_row"] for r in got] == [7, 8, 9, 10]
    assert [r["is_member"] for r in got] == [True, False, True, False]
    assert [r["backend"] for r in got] == ["torch"] * len(TEXTS)
    assert [r.get("text") for r in got] == (TEXTS if include_text else [None] * len(TEXTS))
    assert [r["text_sha256"] for r in got] == staged.column("text_sha256").to_pylist()
    ids = staged.column("input_ids").to_pylist()
    both = stages[0].backend, stages[1].backend
    sizes = staged.column("zlib_size").to_pylist()
    for row, sequence, size in zip(got, ids, sizes, strict=True):
        columns = {
            name: arrays for b in both for name, arrays in b.pass_columns([sequence]).items()
        }
        expected = score_sequence(stats_from_columns(columns)[0], len(sequence), size)
        assert row["n_tokens"] == len(sequence)
        for name, value in expected.items():
            if isinstance(value, float):
                assert row[name] == pytest.approx(value, nan_ok=True), name
            else:
                assert row[name] == value, name


def test_scoring_no_rows_gives_an_empty_table_of_the_scores_schema(models, stages):
    staged = stages[1](stages[0](tokenized(models, [], labelled=False)))
    scores = score_rows(staged, include_text=True)
    assert scores.num_rows == 0
    assert scores.schema.equals(scores_schema(pa.string(), False, False, True), True)


def scores_of(ez: list[float], labelled: bool, with_text: bool) -> pa.Table:
    schema = scores_schema(pa.int64(), labelled, False, with_text)
    rows = [{"id": i, "ez_score": value, "text": f"t{i}"} for i, value in enumerate(ez)]
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.mark.parametrize(("labelled", "with_text"), [(True, True), (False, False), (True, False)])
def test_flagged_is_ez_strictly_above_the_threshold_placed_as_the_scores_schema_says(
    labelled, with_text
):
    threshold = 0.25
    ez = [threshold, np.nextafter(threshold, 1), np.nextafter(threshold, 0), float("nan"), 3.0]
    flagged = add_flagged(scores_of(ez, labelled, with_text), threshold)
    assert flagged.schema.equals(scores_schema(pa.int64(), labelled, True, with_text), True)
    assert flagged.column("flagged").to_pylist() == [False, True, False, False, True]
    np.testing.assert_array_equal(flagged.column("ez_score").to_numpy(), ez)


def test_without_a_threshold_the_scores_are_left_as_they_are():
    scores = scores_of([0.5, -1.0], labelled=True, with_text=True)
    assert add_flagged(scores, None) is scores


def test_written_ray_parts_carry_flagged_in_detection_mode(tmp_path):
    """The Ray engine's writer adds ``flagged`` to each part it writes (its score stage only
    scores)."""
    scores = scores_of([0.1, 0.9, 0.4], labelled=False, with_text=True)
    rows = scores.append_column(SLICE, pa.array([0, 0, 2], pa.int64()))
    counts = _write_parts(rows, str(tmp_path), storage.Encryption(), threshold=0.3)
    assert counts.to_pylist() == [{"part": 0, "rows": 2}, {"part": 2, "rows": 1}]
    parts = [pq.read_table(tmp_path / "scores" / f"part-0000{i}.parquet") for i in (0, 2)]
    assert [p.column("flagged").to_pylist() for p in parts] == [[False, True], [True]]
    assert parts[0].schema.equals(scores_schema(pa.int64(), False, True, True), True)


def test_one_stages_backend_record_is_the_summarys_record():
    record = {"name": "vllm", "reason": "vLLM on 1 GPU", "canary": {"max_abs_diff": 0.0}}
    assert combined_choice({"both": record}) == record


def test_two_stages_records_join_distinct_names_and_label_each_reason():
    vllm = {"name": "vllm", "reason": "vLLM on 2 GPUs"}
    assert combined_choice({"target": vllm, "reference": TORCH}) == {
        "name": "vllm+torch",
        "reason": "target stage: vLLM on 2 GPUs; reference stage: PyTorch backend requested",
        "stages": {"target": vllm, "reference": TORCH},
    }
    assert combined_choice({"target": TORCH, "reference": TORCH})["name"] == "torch"
