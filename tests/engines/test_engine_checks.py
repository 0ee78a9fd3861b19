"""Where an audit runs, checked before it runs: a ``--device`` this machine lacks, a tokenizer
whose ids the models cannot embed, a job-server ``RAY_ADDRESS`` (as infra/local/env.sh sets),
``ezmia report`` on an output that cannot be re-rendered, and Ray actor requests against GPU
node shapes. Each ends in one line and exit code 2, before models or data are read, and
changes nothing. (Refusals on a real Ray cluster and errors raised there are checked in
test_ray_job.py, on its cluster.)"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ezmia.backends.torch import TorchBackend
from ezmia.cli import main
from ezmia.data.datasets import ROW_INDEX
from ezmia.data.text import load_tokenizer
from ezmia.engines.scoring import run_pass, score_rows, tokenize_rows
from ezmia.errors import ModelError
from ezmia.plan.models import plan_models
from tests.conftest import audit_args
from tests.infra import free_port


def _error_line(code: int, err: str, *fragments: str) -> str:
    """Exit 2 and exactly one ``ezmia: error:`` line holding every fragment."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ezmia:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small(models, tmp_path_factory) -> Path:
    """16 labelled rows of the eval set."""
    path = tmp_path_factory.mktemp("small") / "small.parquet"
    pq.write_table(pq.read_table(models.eval).slice(0, 16), path)
    return path


def test_a_device_this_machine_lacks_is_refused_before_models_or_data_are_read(
    models, tmp_path, capsys
):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = [
        (f"cuda:{count}", f"--device cuda:{count}: this machine has"),  # past the last GPU
        ("gpu", "--device 'gpu': not a device torch knows"),
        ("cuda:-1", "--device 'cuda:-1': not a device torch knows"),
        ("meta", "--device meta: ezmia scores on cpu, cuda, mps, xpu, not meta"),
    ]
    if not torch.cuda.is_available():
        cases.append(("cuda", "--device cuda: this machine has no CUDA device"))
    if not torch.backends.mps.is_available():
        cases.append(("mps", "--device mps: this machine has no MPS device"))
    missing = tmp_path / "absent"  # neither models nor data are looked at before the device
    for device, expected in cases:
        args = audit_args(models, tmp_path / "out", "--device", device, data=missing / "d")
        args[args.index("--target") + 1] = str(missing / "model")
        _error_line(main(args), capsys.readouterr().err, expected)
        assert not (tmp_path / "out").exists()


def _add_token(tokenizer_json: Path, token_id: int) -> None:
    data = json.loads(tokenizer_json.read_text())
    data["added_tokens"].append(
        {"id": token_id, "content": "<|sep|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )  # fmt: skip
    tokenizer_json.write_text(json.dumps(data))


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused_at_planning(
    models, small, tmp_path, capsys
):
    """A tokenizer extended with a token (embeddings never resized), saved with both models."""
    vocab = json.loads((models.base / "config.json").read_text())["vocab_size"]
    target = shutil.copytree(models.full, tmp_path / "target")
    reference = shutil.copytree(models.base, tmp_path / "reference")
    for model in (target, reference):
        _add_token(model / "tokenizer.json", vocab)
    out = tmp_path / "out"
    args = audit_args(models, out, data=small, target=target)
    args[args.index("--reference") + 1] = str(reference)
    _error_line(
        main(args),
        capsys.readouterr().err,
        f"{target}/tokenizer.json: the tokenizer can produce token ids up to {vocab}",
        f"{target}/config.json has vocab_size {vocab} (ids 0 to {vocab - 1})",
        "resize_token_embeddings",
    )
    assert not out.exists()


def test_an_out_of_range_token_id_never_reaches_the_embedding(models):
    backend = TorchBackend(plan_models(str(models.full), str(models.base)))
    rows = pa.table(
        {"id": ["a", "b", "c"], "text": ["one two three four", "five six seven", "eight nine"]}
    ).append_column(ROW_INDEX, pa.array([10, 11, 12], pa.int64()))
    tokenized = tokenize_rows(rows, load_tokenizer(models.tokenizer), 32)
    assert score_rows(run_pass(tokenized, backend), include_text=False).num_rows == 3
    for bad in (backend.vocab_size, -1):
        ids = tokenized.column("input_ids").to_pylist()
        ids[1] = [*ids[1][:1], bad, *ids[1][1:]]
        broken = tokenized.set_column(
            tokenized.column_names.index("input_ids"),
            "input_ids",
            pa.array(ids, pa.list_(pa.int32())),
        )
        with pytest.raises(ModelError, match=f"source row 11: token id {bad} is outside"):
            run_pass(broken, backend)


def test_a_job_server_ray_address_scores_locally_with_a_notice_and_is_refused_for_ray(
    models, small, tmp_path, monkeypatch, capsys, caplog
):
    """``. infra/local/env.sh`` exports ``RAY_ADDRESS=http://...`` (the job API)."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with caplog.at_level(logging.WARNING, logger="ezmia"):
        assert main(audit_args(models, tmp_path / "auto", data=small)) == 0
    notice = [r.getMessage() for r in caplog.records if "job server" in r.getMessage()]
    assert len(notice) == 1 and "RAY_ADDRESS=http://127.0.0.1:8265" in notice[0]
    assert "scoring in this process" in notice[0] and "ray job submit" in notice[0]
    assert (tmp_path / "auto" / "_SUCCESS").exists()
    capsys.readouterr()

    refused = [
        (["--engine", "ray"], "RAY_ADDRESS=http://127.0.0.1:8265: this is a Ray job server"),
        (["--ray-address", "https://head:8265"], "--ray-address https://head:8265: this is a"),
    ]
    for extra, expected in refused:
        _error_line(
            main(audit_args(models, tmp_path / "ray", *extra, data=small)),
            capsys.readouterr().err,
            expected,
            "--ray-address HOST:6379",
            "ray job submit",
        )
    monkeypatch.delenv("RAY_ADDRESS")
    started = time.monotonic()
    closed = f"127.0.0.1:{free_port()}"
    code = main(audit_args(models, tmp_path / "ray", "--ray-address", closed, data=small))
    _error_line(code, capsys.readouterr().err, f"--ray-address {closed}: no Ray cluster answers")
    assert time.monotonic() - started < 30  # not Ray's minutes of reconnecting
    assert not (tmp_path / "ray").exists()


# --- ezmia report on outputs it cannot re-render


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _edit_summary(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        summary = json.loads((out / "summary.json").read_text())
        change(summary)
        (out / "summary.json").write_text(json.dumps(summary))

    return edit


def _rewrite_part(change: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def edit(out: Path) -> None:
        part = next((out / "scores").glob("*.parquet"))
        pq.write_table(change(pq.read_table(part)), part)

    return edit


def _only_success(out: Path) -> None:
    shutil.rmtree(out)
    out.mkdir()
    (out / "_SUCCESS").write_bytes(b"")


REPORT_CASES = [
    ("only-success", _only_success, ("{out}/summary.json: missing",)),
    ("no-success", lambda o: (o / "_SUCCESS").unlink(), ("{out}: no _SUCCESS",)),
    ("summary-not-json", lambda o: (o / "summary.json").write_text("{not json"),
     ("{out}/summary.json: not a readable summary",)),
    ("summary-not-an-object", lambda o: (o / "summary.json").write_text("[1, 2]"),
     ("{out}/summary.json: not a summary (expected a JSON object)",)),
    ("summary-without-config", _edit_summary(lambda s: s.pop("config")),
     ("{out}/summary.json: no 'config' object",)),
    ("config-no-longer-validates", _edit_summary(lambda s: s["config"].update(max_lenght=64)),
     ("{out}/summary.json config", "max_lenght: unknown key")),
    ("detection-without-threshold",
     _edit_summary(lambda s: s.update(detection={"fpr": 0.1})),
     ("{out}/summary.json: 'detection' lacks fpr, threshold",)),
    ("no-scores", lambda o: shutil.rmtree(o / "scores"), ("{out}/scores: no scores parts",)),
    ("scores-part-corrupt",
     lambda o: next((o / "scores").glob("*.parquet")).write_bytes(b"not parquet"),
     ("{out}/scores/part-", "not a readable scores part")),
    ("scores-without-a-column", _rewrite_part(lambda t: t.drop_columns(["ez_score"])),
     ("{out}/scores/part-", "no column 'ez_score'")),
    ("scores-fewer-than-the-summary", _rewrite_part(lambda t: t.slice(0, 3)),
     ("{out}/scores: 3 rows, but {out}/summary.json records 16",)),
    ("scores-repeated", _rewrite_part(lambda t: pa.concat_tables([t.slice(0, 8), t.slice(0, 8)])),
     ("{out}/scores: some rows appear twice",)),
]  # fmt: skip


def test_report_on_an_output_it_cannot_rerender_is_refused_and_changes_nothing(
    models, small, tmp_path, capsys
):
    finished = tmp_path / "finished"
    assert main(audit_args(models, finished, data=small)) == 0
    for name, breaks, expected in REPORT_CASES:
        out = tmp_path / name
        shutil.copytree(finished, out)
        breaks(out)
        before = _files(out)
        code = main(["report", str(out)])
        line = _error_line(code, capsys.readouterr().err, *(e.format(out=out) for e in expected))
        assert "rerun the audit" in line, (name, line)
        assert _files(out) == before, name
    assert main(["report", str(finished)]) == 0  # the intact output still re-renders
    _error_line(main(["report", str(tmp_path / "typo")]), capsys.readouterr().err, "typo: nothing")


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A node as ``ray.nodes()`` lists it (the fields the check reads)."""
    resources = {"CPU": cpus, "memory": 8e9, **({"GPU": gpus} if gpus else {})}
    return {"Alive": alive, "Resources": resources}


def test_actor_requests_are_checked_against_whole_alive_nodes():
    """A GPU cluster's shapes (the loopback cluster in test_ray_job.py has no GPUs): an actor
    must fit on one alive node, CPUs and GPUs together."""
    from ezmia.config import RayOptions
    from ezmia.engines.cluster import check_resources
    from ezmia.errors import InputError

    cluster = [_node(8, 1), _node(8, 1), _node(32), _node(64, 8, alive=False)]
    shapes = "alive nodes now: 2 x (8 CPU, 1 GPU), 1 x (32 CPU, 0 GPU)"
    refused = [
        (RayOptions(gpus_per_actor=2), "no node of the Ray cluster has that many GPUs, the most "
         "is 1", "use --ray-gpus-per-actor 1 or less"),
        (RayOptions(gpus_per_actor=1, cpus_per_actor=16), "--ray-cpus-per-actor 16 with "
         "--ray-gpus-per-actor 1: no node of the Ray cluster has both", "fewer CPUs per actor"),
        (RayOptions(gpus_per_actor=0.5, min_actors=5, max_actors=5), "hosts at most 4 scoring "
         "actors at once (0.5 CPU and 0.5 GPU each", "--ray-min-actors 4 or less"),
        (RayOptions(cpus_per_actor=40), "no node of the Ray cluster has that many CPUs",
         "--ray-cpus-per-actor 32 or less"),
    ]  # fmt: skip
    for options, *fragments in refused:
        with pytest.raises(InputError) as raised:
            check_resources(options, cluster, [], options.gpus_per_actor or 0.0)
        for fragment in [*fragments, shapes]:
            assert fragment in str(raised.value), str(raised.value)
    check_resources(RayOptions(gpus_per_actor=0.5, min_actors=4, max_actors=8), cluster, [], 0.5)
    check_resources(RayOptions(cpus_per_actor=16, min_actors=2, max_actors=3), cluster, [], 0.0)


def test_gpu_requests_fit_autoscaling_node_types_scaled_to_zero():
    """A GPU worker group scaled to zero still hosts GPU actors once the autoscaler starts a
    node; only when no node type can host one is it refused (naming the types)."""
    from ezmia.config import RayOptions
    from ezmia.engines.cluster import check_resources
    from ezmia.errors import InputError

    head = [_node(0)]  # a head that takes no work; the GPU group has no node yet
    check_resources(RayOptions(), head, [(8.0, 1.0), (16.0, 4.0)], gpus=4)
    check_resources(RayOptions(min_actors=3, max_actors=3), head, [(8.0, 1.0)], gpus=1)
    with pytest.raises(InputError) as raised:
        check_resources(RayOptions(), head, [(8.0, 1.0), (16.0, 4.0)], gpus=8)
    message = str(raised.value)
    assert "no node of the Ray cluster has a GPU" in message, message
    assert "autoscaling node types: (8 CPU, 1 GPU), (16 CPU, 4 GPU)" in message, message


def test_model_stages_ask_for_their_tensor_parallel_size_in_gpus_on_gpu_clusters(models):
    """``gpus_per_actor`` unset: each model stage's actors ask for its tensor-parallel size on
    a cluster with GPUs, none on a CPU cluster; a LoRA target's one stage follows the target;
    an explicit ``--ray-gpus-per-actor`` applies to every stage."""
    from ezmia.config import AuditConfig
    from ezmia.engines.cluster import stage_gpus

    def config(target: Path, **ray) -> AuditConfig:
        return AuditConfig(
            target=str(target),
            reference=str(models.base),
            data=[str(models.eval)],
            out="unused",
            ray=ray,
            vllm={"tensor_parallel_size": 4, "reference_tensor_parallel_size": 2},
        )

    assert stage_gpus(config(models.full), True) == {"target": 4.0, "reference": 2.0}
    assert stage_gpus(config(models.full), False) == {"target": 0.0, "reference": 0.0}
    assert stage_gpus(config(models.lora), True) == {"both": 4.0}
    explicit = config(models.full, gpus_per_actor=0.5)
    assert stage_gpus(explicit, True) == {"target": 0.5, "reference": 0.5}


def test_commit_accepts_every_row_once_and_refuses_missing_or_repeated_rows(tmp_path):
    """The commit step reads the written parts back (score columns only, never texts) and
    checks them against the planned slices and rows before ``_SUCCESS``."""
    from ezmia.data import outputs, storage
    from ezmia.data.datasets import Fragment
    from ezmia.engines.pipeline import commit, plan_slices
    from ezmia.errors import OutputError

    fragments = [Fragment("a", 0, 0, 5), Fragment("b", 0, 5, 3)]
    slices = plan_slices(fragments, rows_per_block=2)
    assert slices == [0, 2, 4, 5, 7]
    output = outputs.Output(str(tmp_path / "out"), storage.Encryption())

    def write(start: int, rows: list[int]) -> None:
        table = pa.table({"source_row": rows, "text": [f"t{r}" for r in rows]})
        outputs.write_scores(output.uri, table, None, part=start)

    parts = {0: [0, 1], 2: [2, 3], 4: [4], 5: [5, 6], 7: [7]}
    for start, rows in parts.items():
        write(start, rows)
    reported = {start: len(rows) for start, rows in parts.items()}
    scores = commit(output, fragments, slices, reported)
    assert scores.column_names == ["source_row"]
    assert scores.column("source_row").to_pylist() == list(range(8))
    with pytest.raises(OutputError, match="1 scores part"):
        commit(output, fragments, slices, {k: v for k, v in reported.items() if k != 7})
    write(5, [5])  # a split block: its part rewritten with part of its rows
    with pytest.raises(OutputError, match="no source row 6"):
        commit(output, fragments, slices, reported)
    write(5, [5, 6, 6])
    with pytest.raises(OutputError, match="source row 6 twice"):
        commit(output, fragments, slices, reported)


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_datas_stack_traces_reach_the_console_only_with_verbose(verbose):
    """Ray Data prints pages of its own frames for a failed run; ezmia's one line points at
    its log file, which keeps them (its console handler drops records marked ``hide``)."""
    from ray.data._internal.logging import HiddenRecordFilter

    from ezmia.engines.cluster import quiet_ray_data

    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append
    ray_data, ezmia_logger = logging.getLogger("ray.data"), logging.getLogger("ezmia")
    level = ezmia_logger.level
    ray_data.addHandler(capture)
    try:
        ezmia_logger.setLevel(logging.INFO if verbose else logging.WARNING)
        quiet_ray_data()
        quiet_ray_data()  # joining again adds no second filter
        traces = logging.getLogger("ray.data.exceptions")
        assert len(traces.filters) == (0 if verbose else 1)
        traces.error("Full stack trace:\n...")
        logging.getLogger("ray.data.other").warning("a warning stays on the console")
    finally:
        ray_data.removeHandler(capture)
        ezmia_logger.setLevel(level)
        quiet_ray_data()
    trace, warning = records
    assert HiddenRecordFilter().filter(trace) is verbose
    assert HiddenRecordFilter().filter(warning) is True
