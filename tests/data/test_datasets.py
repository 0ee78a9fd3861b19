"""Dataset input, on real Parquet files (local and on a real S3 endpoint): what Spark, Hadoop
and S3 consoles leave beside the data is skipped, schemas are unified across files before
scoring, ids are integers or strings, and no row, text or file is both a member and a
non-member. Refusals are exit code 2 and one ``ezmia: error:`` line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.cli import main
from ezmia.data.datasets import (
    Columns,
    Fragment,
    dataset_files,
    normalize,
    plan_fragments,
    read_fragment,
    read_keys,
)
from ezmia.engines.pipeline import SLICE, _read_slices
from ezmia.errors import InputError

LABELLED = Columns("text", "id", "is_member")


def _texts(start: int, count: int) -> list[str]:
    return [
        f"Row {i}: a sentence about the number {i} and what follows it."
        for i in range(start, start + count)
    ]


def _ray_read(fragment: Fragment) -> pa.Table:
    """A fragment as the Ray engine reads it (in one slice, without its slice column)."""
    batch = pa.Table.from_pylist([dataclasses.asdict(fragment)])
    (rows,) = _read_slices(batch, LABELLED, rows_per_block=1 << 20)
    return rows.drop_columns([SLICE])


def _write(path: Path, ids: pa.Array, texts: pa.Array | None = None, labels=None, **kw) -> Path:
    """A Parquet file of ``id``, ``text`` and ``is_member`` columns (texts and labels made up
    from the row count when not given)."""
    n = len(ids)
    start = int(ids[0].as_py()) if n and pa.types.is_integer(ids.type) else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": ids,
            "text": texts if texts is not None else pa.array(_texts(start, n), pa.string()),
            "is_member": labels
            if labels is not None
            else pa.array([i % 2 == 0 for i in range(n)], pa.bool_()),
        }
    )
    pq.write_table(table, path, **kw)
    return path


def _spark_folder(root: Path) -> tuple[Path, list[int]]:
    """A dataset folder as Spark and Hadoop leave it; returns it and its data rows' ids."""
    data = root / "data"
    _write(data / "part-00000.parquet", pa.array(range(0, 6), pa.int64()), row_group_size=4)
    _write(data / "part-00001.parquet", pa.array([], pa.int64()))  # Spark's 0-row part
    _write(data / "part-00002.parquet", pa.array(range(6, 10), pa.int32()), row_group_size=3)
    _write(data / "split=b" / "part-00003.parquet", pa.array(range(10, 12), pa.int64()))
    (data / "part-00004.parquet").write_bytes(b"")  # a 0-byte part
    (data / "_SUCCESS").write_bytes(b"")
    (data / "_committed_8812").write_text('{"added": []}')
    (data / "._part-00000.parquet").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    (data / ".part-00000.parquet.crc").write_bytes(b"crc\x00\x01")
    (data / "part-00002.parquet.crc").write_bytes(b"crc\x00\x02")
    _write(data / ".hidden" / "part-00000.parquet", pa.array(range(100, 103), pa.int64()))
    _write(data / "_temporary" / "0" / "part-00009.parquet", pa.array(range(200, 203)))
    return data, list(range(12))


def _ids(fragments, columns: Columns = LABELLED) -> list:
    return read_keys(fragments, columns, digests=False).column("id").to_pylist()


def _refused(capsys, args: list[str], *expected: str) -> str:
    """Exit code 2 and exactly one ``ezmia: error:`` line holding every fragment."""
    code = main(["audit", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("ezmia:")]
    assert len(lines) == 1 and lines[0].startswith("ezmia: error: "), err
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _audit_args(models, out: Path, *data: str) -> list[str]:
    return [
        "--target", str(models.full), "--reference", str(models.base), *data,
        "--out", str(out), "--max-length", "32", "--bootstrap-rounds", "0",
    ]  # fmt: skip


# --- side files: skipped under a folder or prefix, read when named


def test_spark_folder_plans_only_its_data_rows(tmp_path):
    data, ids = _spark_folder(tmp_path)
    fragments = plan_fragments([str(data)], LABELLED)
    assert sorted({Path(f.uri).relative_to(data).as_posix() for f in fragments}) == [
        "part-00000.parquet",
        "part-00002.parquet",
        "split=b/part-00003.parquet",
    ]
    assert [f.offset for f in fragments] == [0, 4, 6, 9, 10]
    assert all(f.num_rows for f in fragments)
    assert _ids(fragments) == ids


def test_partition_folders_starting_with_underscore_are_data(tmp_path):
    data = tmp_path / "data"
    _write(data / "_day=1" / "part-0.parquet", pa.array([0, 1], pa.int64()))
    _write(data / "_day=1" / "_temporary" / "part-0.parquet", pa.array([5, 6], pa.int64()))
    assert _ids(plan_fragments([str(data)], LABELLED)) == [0, 1]


def test_default_ids_are_global_row_numbers_across_files_and_row_groups(tmp_path):
    data, ids = _spark_folder(tmp_path)
    fragments = plan_fragments([str(data)], Columns("text", None, "is_member"))
    keys = read_keys(fragments, Columns("text", None, "is_member"), digests=False)
    assert keys.column("id").to_pylist() == ids  # unique: one number per data row
    assert keys.column("__file_row").to_pylist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]


def test_s3_prefix_with_folder_markers_plans_only_its_data_rows(s3, bucket, tmp_path):
    data, ids = _spark_folder(tmp_path)
    client = s3.client()
    for path in sorted(data.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"data/{path.relative_to(data).as_posix()}")
    for marker in ("data/", "data/split=b/", "data/_temporary/"):  # the console's "Create folder"
        client.put_object(Bucket=bucket, Key=marker, Body=b"")
    client.put_object(Bucket=bucket, Key="data/split=a_$folder$", Body=b"")  # Hadoop s3n
    client.put_object(Bucket=bucket, Key="data/empty/", Body=b"")
    for uri in (f"s3://{bucket}/data/", f"s3://{bucket}/data"):
        fragments = plan_fragments([uri], LABELLED)
        assert _ids(fragments) == ids, uri
        assert {f.uri.rsplit("/", 1)[1] for f in fragments} == {
            "part-00000.parquet",
            "part-00002.parquet",
            "part-00003.parquet",
        }


def test_a_file_named_by_the_user_is_read_as_given(tmp_path):
    hidden = _write(tmp_path / "_staging" / ".export.parq", pa.array([7, 8], pa.int64()))
    assert dataset_files(str(hidden)) == ([str(hidden)], True)
    assert _ids(plan_fragments([str(hidden)], LABELLED)) == [7, 8]
    empty = _write(tmp_path / "empty.parquet", pa.array([], pa.int64()))
    assert plan_fragments([str(empty)], LABELLED) == []  # refused later as "no rows"


def test_a_file_named_by_the_user_is_read_as_given_however_its_path_is_written(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    export = _write(tmp_path / "exports" / "members.bin", pa.array([3, 4], pa.int64()))
    assert dataset_files("./exports/members.bin") == ([str(Path("exports/members.bin"))], True)
    assert dataset_files(f"{export.parent}//members.bin") == ([str(export)], True)


def test_a_dataset_in_a_missing_bucket_is_refused_in_one_line(s3):
    uri = "s3://no-such-bucket-here/data/"
    with pytest.raises(InputError) as err:
        dataset_files(uri)
    assert str(err.value) == (
        f"{uri}: cannot list: the bucket does not exist (check the bucket name, and the "
        "endpoint and region)"
    )


def test_a_prefix_whose_only_object_is_its_own_folder_marker_holds_no_data(s3, bucket):
    s3.client().put_object(Bucket=bucket, Key="job/", Body=b"")  # the console's "Create folder"
    uri = f"s3://{bucket}/job/"
    with pytest.raises(InputError) as err:
        dataset_files(uri)
    assert str(err.value) == (
        f"{uri}: no Parquet files found (expected *.parquet under this path; found e.g. {uri}, "
        "which Spark, Hadoop or S3 leave beside data)"
    )


SIDE_FILES = [
    ("spark-success", ["_SUCCESS"]),
    ("hadoop-checksum", ["part-0.parquet.crc"]),
    ("hidden", [".part-0.parquet", ".hidden/part-0.parquet"]),
    ("s3-folder-markers", ["", "sub/", "a_$folder$"]),
]


@pytest.mark.parametrize("case", SIDE_FILES, ids=[c[0] for c in SIDE_FILES])
def test_prefix_holding_only_side_files_is_refused(case, s3, bucket):
    _, names = case
    for name in names:
        s3.client().put_object(Bucket=bucket, Key=f"job/{name}", Body=b"PAR1 not data")
    with pytest.raises(InputError) as err:
        plan_fragments([f"s3://{bucket}/job/"], LABELLED)
    assert str(err.value).startswith(f"s3://{bucket}/job/: no Parquet files found")
    assert "which Spark, Hadoop or S3 leave beside data" in str(err.value)


def test_folder_of_side_files_only_is_refused(tmp_path):
    data = tmp_path / "job"
    data.mkdir()
    (data / "_SUCCESS").write_bytes(b"")
    (data / "part-0.parquet.crc").write_bytes(b"crc")
    with pytest.raises(InputError, match="no Parquet files found") as err:
        plan_fragments([str(data)], LABELLED)
    assert "which Spark, Hadoop or S3 leave beside data" in str(err.value)


def test_folder_of_empty_parts_is_refused(tmp_path):
    data = tmp_path / "job"
    _write(data / "part-0.parquet", pa.array([], pa.int64()))
    (data / "part-1.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=f"{data}: every Parquet file under this path is empty"):
        plan_fragments([str(data)], LABELLED)


# --- schemas unified across files before anything is scored

UNIFIED = [
    ("int32+int64", pa.int32(), pa.int64(), pa.int64()),
    ("uint32+int16", pa.uint32(), pa.int16(), pa.int64()),
    ("uint8+uint64", pa.uint8(), pa.uint64(), pa.uint64()),
    ("int16+int16", pa.int16(), pa.int16(), pa.int16()),
    ("string+large_string", pa.string(), pa.large_string(), pa.large_string()),
    ("dictionary+string", pa.dictionary(pa.int32(), pa.string()), pa.string(), pa.string()),
]


def _id_values(data_type: pa.DataType, start: int) -> pa.Array:
    values = list(range(start, start + 3))
    if pa.types.is_dictionary(data_type):
        return pa.array([f"k{v}" for v in values]).dictionary_encode()
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return pa.array([f"k{v}" for v in values], data_type)
    return pa.array(values, data_type)


@pytest.mark.parametrize("case", UNIFIED, ids=[c[0] for c in UNIFIED])
def test_id_types_are_unified_losslessly_for_both_engines(case, tmp_path):
    _, first, second, unified = case
    a = _write(tmp_path / "a.parquet", _id_values(first, 0))
    b = _write(tmp_path / "b.parquet", _id_values(second, 3))
    fragments = plan_fragments([str(a), str(b)], LABELLED)
    local = [normalize(read_fragment(f, LABELLED), LABELLED, f.uri) for f in fragments]
    ray = [_ray_read(f) for f in fragments]
    for table in (*local, *ray):
        assert table.schema == local[0].schema
        assert table.schema.field("id").type == unified
    strings = pa.types.is_string(unified) or pa.types.is_large_string(unified)
    expected = [f"k{i}" if strings else i for i in range(6)]
    assert pa.concat_tables(ray).column("id").to_pylist() == expected
    assert pa.concat_tables(local).column("id").to_pylist() == expected


def test_text_and_label_types_are_unified_for_both_engines(tmp_path):
    texts = _texts(0, 6)
    a = _write(tmp_path / "a.parquet", pa.array([0, 1]), pa.array(texts[:2], pa.string()))
    b = _write(
        tmp_path / "b.parquet",
        pa.array([2, 3]),
        pa.array(texts[2:4], pa.large_string()),
        pa.array([1, 0], pa.int8()),
    )
    c = _write(
        tmp_path / "c.parquet",
        pa.array([4, 5]),
        pa.array([t.encode() for t in texts[4:]], pa.binary()),
        pa.array([0, 1], pa.int64()),
    )
    fragments = plan_fragments([str(a), str(b), str(c)], LABELLED)
    tables = [_ray_read(f) for f in fragments]
    assert {t.schema for t in tables} == {tables[0].schema}
    rows = pa.concat_tables(tables)
    assert rows.schema.field("text").type == pa.string()
    assert rows.column("text").to_pylist() == texts
    assert rows.column("is_member").to_pylist() == [True, False, True, False, False, True]


REFUSED_PAIRS = [
    ("int64+float64", pa.array([1, 2]), pa.array([3.0, 4.0]), "b", "double", "a.parquet has int64"),
    ("string+int64", pa.array(["x", "y"]), pa.array([3, 4]), "b", "int64", "a.parquet has string"),
    ("int64+uint64", pa.array([1, 2]), pa.array([3, 4], pa.uint64()), "b", "uint64", "a.parquet"),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_PAIRS, ids=[c[0] for c in REFUSED_PAIRS])
def test_id_types_that_cannot_be_unified_are_refused_naming_both_files(case, tmp_path):
    _, first, second, bad, bad_type, other = case
    a = _write(tmp_path / "a.parquet", first)
    b = _write(tmp_path / "b.parquet", second)
    with pytest.raises(InputError) as err:
        plan_fragments([str(a), str(b)], LABELLED)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / bad}.parquet: id column 'id' has type {bad_type}")
    assert other in message and "cast" in message and "int64 or string" in message


NOT_IDS = [
    ("double", pa.array([0.5, 1.0])),
    ("bool", pa.array([True, False])),
    ("binary", pa.array([b"a", b"b"])),
    ("struct", pa.array([{"k": 1}, {"k": 2}])),
    ("list", pa.array([[1], [2]])),
    ("map", pa.array([[("k", 1)], [("k", 2)]], pa.map_(pa.string(), pa.int64()))),
    ("timestamp", pa.array([1, 2], pa.timestamp("s"))),
]


@pytest.mark.parametrize("case", NOT_IDS, ids=[c[0] for c in NOT_IDS])
def test_ids_that_are_not_integers_or_strings_are_refused(case, tmp_path):
    name, values = case
    path = _write(tmp_path / f"{name}.parquet", values)
    with pytest.raises(InputError) as err:
        plan_fragments([str(path)], LABELLED)
    message = str(err.value)
    assert message.startswith(f"{path}: id column 'id' has type ")
    assert "ids must be integers or strings" in message and "cast the id column" in message


def test_id_column_that_is_the_text_or_label_column_is_refused():
    with pytest.raises(InputError, match="--id-column 'text' is also the text column"):
        Columns("text", "text")
    with pytest.raises(InputError, match="--id-column 'is_member' is also the label column"):
        Columns("text", "is_member", "is_member")


# --- the CLI: each rule ends in one line, before anything is scored


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Small labelled datasets for the CLI cases."""
    root = tmp_path_factory.mktemp("io")
    texts = _texts(0, 8)
    _write(
        root / "members" / "part-0.parquet", pa.array(["m0", "m1", "m2", "m3"]), pa.array(texts[:4])
    )
    _write(
        root / "nonmembers" / "part-0.parquet",
        pa.array(["n0", "n1", "n2", "n3"]),
        pa.array(texts[4:]),
    )
    _write(root / "same_id.parquet", pa.array(["n0", "m2", "n9"]), pa.array(_texts(20, 3)))
    _write(
        root / "same_text.parquet",
        pa.array(["x0", "x1", "x2"]),
        pa.array([_texts(30, 1)[0], texts[2], _texts(31, 1)[0]]),
    )
    labelled = pa.array([True, False, True, True, False, False])
    _write(
        root / "labelled_same_text.parquet",
        pa.array(range(6)),
        pa.array([texts[0], texts[1], texts[2], texts[3], texts[2], texts[5]]),
        labelled,
    )
    _write(
        root / "float_ids.parquet",
        pa.array([0.0, 1.0, float("nan"), 3.0]),
        pa.array(texts[:4]),
        pa.array([True, False, True, False]),
    )
    _write(
        root / "int_ids.parquet",
        pa.array([10, 11], pa.int64()),
        pa.array(_texts(40, 2)),
        pa.array([True, False]),
    )
    _write(
        root / "dup_in_row_groups.parquet",
        pa.array([0, 1, 2, 3, 4, 1]),
        pa.array(_texts(50, 6)),
        row_group_size=3,
    )
    return root  # fmt: skip


def test_member_and_nonmember_path_overlap_is_refused(models, files, tmp_path, capsys):
    members, nonmembers = files / "members", files / "nonmembers"
    part = members / "part-0.parquet"
    cases = [
        ["--members", str(part), "--nonmembers", str(part)],
        ["--members", str(members), "--nonmembers", str(nonmembers), "--nonmembers", str(part)],
        ["--members", f"{members}/", "--nonmembers", str(members / ".." / "members")],
    ]  # fmt: skip
    for data in cases:
        _refused(
            capsys,
            _audit_args(models, tmp_path / "out", *data),
            "part-0.parquet: given as both --members",
            "and --nonmembers",
            "give each file to one side only",
        )
    assert not (tmp_path / "out").exists()


def test_member_and_nonmember_s3_overlap_is_refused(models, files, s3, bucket, tmp_path, capsys):
    client = s3.client()
    client.upload_file(str(files / "members" / "part-0.parquet"), bucket, "m/part-0.parquet")
    client.put_object(Bucket=bucket, Key="m/", Body=b"")
    data = ["--members", f"s3://{bucket}/m", "--nonmembers", f"s3://{bucket}/m/part-0.parquet"]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data),
        f"s3://{bucket}/m/part-0.parquet: given as both --members (s3://{bucket}/m) and "
        f"--nonmembers (s3://{bucket}/m/part-0.parquet)",
    )


def test_same_id_as_member_and_nonmember_is_refused(models, files, tmp_path, capsys):
    data = ["--members", str(files / "members"), "--nonmembers", str(files / "same_id.parquet")]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data, "--id-column", "id"),
        f"{files}/members/part-0.parquet row 2 (member) and {files}/same_id.parquet row 1 "
        "(non-member) have the same id 'm2' (column 'id')",
        "remove it from one side, or fix its label",
    )


def test_same_text_as_member_and_nonmember_is_refused(models, files, tmp_path, capsys):
    data = ["--members", str(files / "members"), "--nonmembers", str(files / "same_text.parquet")]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data, "--id-column", "id"),
        f"{files}/members/part-0.parquet row 2 (member) and {files}/same_text.parquet row 1 "
        "(non-member) hold the same text",
        "remove it from one side, or fix its label",
    )
    labelled = ["--data", str(files / "labelled_same_text.parquet"), "--label-column", "is_member"]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *labelled),
        f"{files}/labelled_same_text.parquet row 2 (member) and "
        f"{files}/labelled_same_text.parquet row 4 (non-member) hold the same text",
    )
    assert not (tmp_path / "out").exists()


def test_float_ids_are_refused_before_scoring(models, files, tmp_path, capsys):
    data = ["--data", str(files / "float_ids.parquet"), "--id-column", "id"]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data, "--label-column", "is_member"),
        f"{files}/float_ids.parquet: id column 'id' has type double",
        "cast the id column to int64 or string",
    )
    data += ["--data", str(files / "int_ids.parquet")]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data, "--label-column", "is_member"),
        f"{files}/float_ids.parquet: id column 'id' has type double",
        f"{files}/int_ids.parquet has int64",
    )


def test_id_column_equal_to_text_column_is_refused(models, files, tmp_path, capsys):
    data = ["--data", str(files / "int_ids.parquet"), "--label-column", "is_member"]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data, "--id-column", "text"),
        "--id-column 'text' is also the text column",
        "texts are private",
    )


def test_ids_repeated_across_row_groups_are_refused(models, files, tmp_path, capsys):
    data = ["--data", str(files / "dup_in_row_groups.parquet"), "--id-column", "id"]
    _refused(
        capsys,
        _audit_args(models, tmp_path / "out", *data),
        f"{files}/dup_in_row_groups.parquet row 1: id column 'id' has duplicates",
        f"again at {files}/dup_in_row_groups.parquet row 5",
    )


# --- positive: folders as Spark and S3 leave them audit fine, every data row exactly once


def test_spark_folder_audits_with_exactly_its_data_rows(models, tmp_path):
    data, ids = _spark_folder(tmp_path)
    out = tmp_path / "out"
    flags = ["--data", str(data), "--id-column", "id", "--label-column", "is_member"]
    assert main(["audit", *_audit_args(models, out, *flags)]) == 0
    scores = pq.read_table(out / "scores")
    assert scores.schema.field("id").type == pa.int64()
    assert sorted(scores.column("id").to_pylist()) == ids
    assert sorted(scores.column("source_row").to_pylist()) == list(range(len(ids)))


def test_s3_prefix_with_folder_marker_audits_with_exactly_its_data_rows(
    models, s3, bucket, tmp_path
):
    data, ids = _spark_folder(tmp_path)
    client = s3.client()
    for path in sorted(data.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"data/{path.relative_to(data).as_posix()}")
    client.put_object(Bucket=bucket, Key="data/", Body=b"")
    out = tmp_path / "out"
    flags = ["--data", f"s3://{bucket}/data/", "--label-column", "is_member"]
    assert main(["audit", *_audit_args(models, out, *flags)]) == 0
    scores = pq.read_table(out / "scores")
    assert sorted(scores.column("id").to_pylist()) == ids  # default ids: global row numbers
