"""Datasets, exactly: every refusal of ``ezmia.data.datasets`` word for word (what is wrong
and how to fix it), file row numbers in every row group of a file, the "every file is empty"
check per dataset, planning reads that never touch the texts, and the text, label and id
conversions. Local files only; the S3 paths run in test_datasets.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.data import storage
from ezmia.data.datasets import (
    FILE_ROW,
    FRAGMENT,
    ROW_INDEX,
    TEXT_DIGEST,
    Columns,
    Fragment,
    check_schema,
    dataset_files,
    labels_to_bool,
    member_and_nonmember,
    normalize,
    plan_fragments,
    read_fragment,
    read_keys,
    text_digests,
    unify_id_types,
)
from ezmia.errors import InputError

LABELLED = Columns("text", "id", "label")


def write(path: Path, n: int, start: int = 0, **kw) -> Path:
    """``n`` rows of ``id`` (int64 from ``start``), ``text``, ``label`` (0/1) and ``other``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "text": pa.array([f"text {i}" for i in range(start, start + n)], pa.string()),
            "label": pa.array([i % 2 for i in range(start, start + n)], pa.int8()),
            "other": pa.array([1.5] * n, pa.float64()),
        }
    )
    pq.write_table(table, path, **kw)
    return path


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as raised:
        call(*args, **kwargs)
    return str(raised.value)


# --- refusals, word for word ---------------------------------------------------------------


def test_id_column_that_is_the_text_or_label_column():
    assert refusal(Columns, "text", "text") == (
        "--id-column 'text' is also the text column: ids are copied into the scores and the "
        "report, texts are private; choose another --id-column, or drop it to number rows by "
        "position"
    )
    assert refusal(Columns, "text", "y", "y") == (
        "--id-column 'y' is also the label column; choose another --id-column, or drop it to "
        "number rows by position"
    )
    assert Columns("text", None, None).needed() == ["text"]
    assert Columns("t", "i", "l").needed() == ["t", "i", "l"]


def test_missing_path_and_folders_without_parquet(tmp_path):
    missing = str(tmp_path / "nothing")
    assert refusal(dataset_files, missing) == (
        f"{missing}: no such file, directory or prefix (check the dataset path)"
    )
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "b.csv").write_text("x")
    (tmp_path / "csv" / "a.csv").write_text("x")
    (tmp_path / "csv" / "_SUCCESS").write_text("")
    assert refusal(dataset_files, str(tmp_path / "csv")) == (
        f"{tmp_path / 'csv'}: no Parquet files found (expected *.parquet under this path; found "
        f"e.g. {tmp_path / 'csv' / 'a.csv'})"
    )
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "_SUCCESS").write_text("")
    (tmp_path / "side" / ".x.parquet").write_text("")
    assert refusal(dataset_files, str(tmp_path / "side")) == (
        f"{tmp_path / 'side'}: no Parquet files found (expected *.parquet under this path; found "
        f"e.g. {tmp_path / 'side' / '.x.parquet'}, which Spark, Hadoop or S3 leave beside data)"
    )


def test_folder_listing_keeps_parquet_and_parq_and_partitions(tmp_path):
    for name in ("b.parq", "a.parquet", "_day=1/c.parquet", "d.txt", "e.parquet.crc",
                 "_tmp/f.parquet", "g_$folder$"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    files, explicit = dataset_files(str(tmp_path))
    assert (files, explicit) == (
        [str(tmp_path / n) for n in ("_day=1/c.parquet", "a.parquet", "b.parq")],
        False,
    )
    assert dataset_files(str(tmp_path / "d.txt")) == ([str(tmp_path / "d.txt")], True)


def test_unreadable_and_vanished_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet at all")
    message = refusal(plan_fragments, [str(bad)], LABELLED)
    assert message.startswith(f"{bad}: not a readable Parquet file (")
    assert message.endswith("); re-export it") and "\n" not in message
    gone = Fragment(str(tmp_path / "gone.parquet"), 0, 0, 1)
    assert refusal(read_fragment, gone, LABELLED) == f"{tmp_path / 'gone.parquet'}: file not found"


def test_a_corrupt_row_group_names_the_file_and_group(tmp_path):
    path = write(tmp_path / "a.parquet", 50, row_group_size=25)
    fragments = plan_fragments([str(path)], LABELLED)
    data = bytearray(path.read_bytes())
    start = fragments[1].row_group  # the second group's pages lie after the first's
    meta = pq.read_metadata(path).row_group(start).column(0)
    offset = meta.data_page_offset
    data[offset : offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(OSError) as raised:
        pq.ParquetFile(path).read_row_group(1, columns=LABELLED.needed())
    reason = str(raised.value).splitlines()[0][:300]
    assert refusal(read_fragment, fragments[1], LABELLED) == (
        f"{path}: row group 1 is unreadable ({reason}); the file is corrupt, re-export it"
    )


def test_schema_refusals():
    schema = pa.schema({"text": pa.int64(), "id": pa.int64(), "label": pa.float64()})
    assert refusal(check_schema, "f.parquet", schema, Columns("body", "id")) == (
        "f.parquet: no column 'body' (columns: text, id, label); choose it with "
        "--text-column/--id-column/--label-column"
    )
    assert refusal(check_schema, "f.parquet", schema, Columns("text", "id", "label")) == (
        "f.parquet: text column 'text' has type int64, expected string; choose the text column "
        "with --text-column"
    )
    schema = pa.schema({"text": pa.large_binary(), "label": pa.float64()})
    assert refusal(check_schema, "f.parquet", schema, Columns("text", None, "label")) == (
        "f.parquet: label column 'label' has type double, expected bool or 0/1"
    )
    for text in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(),
                 pa.dictionary(pa.int32(), pa.string())):  # fmt: skip
        for label in (pa.bool_(), pa.int8(), pa.uint64()):
            check_schema(
                "f", pa.schema({"text": text, "label": label}), Columns("text", None, "label")
            )


def test_id_type_refusals():
    assert refusal(unify_id_types, [("a", pa.int64()), ("b", pa.float64())], "id") == (
        "b: id column 'id' has type double, but ids must be integers or strings; a has int64: "
        "cast the id column to int64 or string in every file, or drop --id-column to number "
        "rows by position"
    )
    assert refusal(unify_id_types, [("a", pa.binary())], "key") == (
        "a: id column 'key' has type binary, but ids must be integers or strings: cast the id "
        "column to int64 or string in every file, or drop --id-column to number rows by position"
    )
    assert refusal(unify_id_types, [("a", pa.int32()), ("b", pa.string())], "id") == (
        "b: id column 'id' has type string but a has int32; give every file the same id type "
        "(cast to int64 or string)"
    )
    mixed = [("a", pa.int8()), ("b", pa.uint64()), ("c", pa.uint8())]
    assert refusal(unify_id_types, mixed, "id") == (
        "b: id column 'id' has type uint64 but a has signed integers; give every file the same "
        "id type (cast to int64 or string)"
    )


@pytest.mark.parametrize(
    ("types", "unified"),
    [
        ([pa.int32()], pa.int32()),
        ([pa.dictionary(pa.int8(), pa.string()), pa.string()], pa.string()),
        ([pa.string(), pa.large_string()], pa.large_string()),
        ([pa.int8(), pa.uint32()], pa.int64()),
        ([pa.uint8(), pa.uint64()], pa.uint64()),
    ],
    ids=["one-type", "dictionary-and-plain", "string-widths", "signed-and-unsigned", "unsigned"],
)
def test_id_types_unify(types, unified):
    assert unify_id_types([(f"f{i}", t) for i, t in enumerate(types)], "id") == unified


def test_a_file_on_both_sides_is_refused_naming_both_flags(tmp_path):
    path = str(write(tmp_path / "d" / "a.parquet", 3))
    assert refusal(plan_fragments, [str(tmp_path / "d"), path], LABELLED, [False, True]) == (
        f"{path}: given as both --nonmembers ({tmp_path / 'd'}) and --members ({path}); a row "
        "is either a member or a non-member: give each file to one side only"
    )
    twice = plan_fragments([path, path], LABELLED, [True, True])
    assert [f.label for f in twice] == [True, True] and twice[1].offset == 3


def test_every_file_empty_is_refused_per_dataset(tmp_path):
    good = str(write(tmp_path / "good.parquet", 2))
    write(tmp_path / "empty" / "a.parquet", 0)
    (tmp_path / "empty" / "b.parquet").write_bytes(b"")
    assert refusal(plan_fragments, [good, str(tmp_path / "empty")], LABELLED) == (
        f"{tmp_path / 'empty'}: every Parquet file under this path is empty (0 bytes or 0 rows); "
        "point at the folder that holds the data"
    )
    write(tmp_path / "empty" / "c.parquet", 1, start=2)
    fragments = plan_fragments([good, str(tmp_path / "empty")], LABELLED)
    assert [(Path(f.uri).name, f.offset, f.num_rows) for f in fragments] == [
        ("good.parquet", 0, 2),
        ("c.parquet", 2, 1),
    ]


def test_a_named_empty_file_is_read_as_given(tmp_path):
    empty = str(write(tmp_path / "empty.parquet", 0))
    assert plan_fragments([empty], LABELLED) == []


def test_labels_null_and_bad_values_name_the_row():
    assert refusal(labels_to_bool, pa.chunked_array([[1, 0, None]]), "y", "f.parquet") == (
        "f.parquet: label column 'y' is null at row 2; set every label (true/1 = member, "
        "false/0 = non-member)"
    )
    rows = pa.chunked_array([[40, 41, 42]])
    assert refusal(labels_to_bool, pa.chunked_array([[1, 0, 2]]), "y", "f.parquet", rows) == (
        "f.parquet: label column 'y' has value 2 at row 42; expected bool or 0/1 (1 = member)"
    )
    assert refusal(labels_to_bool, pa.chunked_array([[-1, 1]]), "y", "f") == (
        "f: label column 'y' has value -1 at row 0; expected bool or 0/1 (1 = member)"
    )
    assert labels_to_bool(pa.chunked_array([[1, 0, 1]], pa.uint8()), "y", "f").to_pylist() == [
        True,
        False,
        True,
    ]
    booleans = pa.chunked_array([[False, True]])
    assert labels_to_bool(booleans, "y", "f").to_pylist() == [False, True]


# --- rows, fragments and planning reads ----------------------------------------------------


def test_file_rows_in_every_row_group_and_errors_name_them(tmp_path):
    """Row groups of 4 over 11 rows: the bad label in the third group is at file row 9."""
    first = write(tmp_path / "a.parquet", 3)
    path = tmp_path / "b.parquet"
    labels = [0, 1] * 4 + [0, 7, 1]
    table = pa.table(
        {"id": pa.array(range(11), pa.int64()), "text": [f"t{i}" for i in range(11)],
         "label": pa.array(labels, pa.int64())}
    )  # fmt: skip
    pq.write_table(table, path, row_group_size=4)
    fragments = plan_fragments([str(first), str(path)], Columns("text", None, "label"))
    assert [(f.row_group, f.offset, f.num_rows, f.file_offset) for f in fragments] == [
        (0, 0, 3, 0),
        (0, 3, 4, 0),
        (1, 7, 4, 4),
        (2, 11, 3, 8),
    ]
    assert {f.id_type for f in fragments} == {None}  # no id column: ids are row numbers
    third = read_fragment(fragments[3], Columns("text", None, "label"))
    assert third.column(FILE_ROW).to_pylist() == [8, 9, 10]
    assert third.column(ROW_INDEX).to_pylist() == [11, 12, 13]
    assert refusal(read_keys, fragments, Columns("text", None, "label"), False) == (
        f"{path}: label column 'label' has value 7 at row 9; expected bool or 0/1 (1 = member)"
    )


def test_row_groups_of_zero_rows_make_no_fragment_but_keep_offsets(tmp_path):
    path = tmp_path / "a.parquet"
    schema = pa.schema({"text": pa.string()})
    with pq.ParquetWriter(path, schema) as writer:
        writer.write_table(pa.table({"text": ["a", "b"]}, schema=schema))
        writer.write_table(pa.table({"text": pa.array([], pa.string())}, schema=schema))
        writer.write_table(pa.table({"text": ["c"]}, schema=schema))
    assert pq.read_metadata(path).num_row_groups == 3
    fragments = plan_fragments([str(path)], Columns())
    assert [(f.row_group, f.offset, f.file_offset) for f in fragments] == [(0, 0, 0), (2, 2, 2)]


def test_planning_reads_ids_and_labels_but_never_the_text(tmp_path):
    path = write(tmp_path / "a.parquet", 4, start=10)
    (fragment,) = plan_fragments([str(path)], LABELLED)
    assert fragment.id_type == "int64"
    keys = read_fragment(fragment, LABELLED, with_text=False)
    assert keys.column_names == ["id", "label", ROW_INDEX, FILE_ROW]
    unlabelled = read_fragment(fragment, Columns("text", None, None), with_text=False)
    assert unlabelled.column_names == [ROW_INDEX, FILE_ROW]
    table = read_keys([fragment, fragment], LABELLED, digests=False)
    assert table.column_names == ["id", ROW_INDEX, FILE_ROW, "is_member", FRAGMENT]
    assert table.column("id").to_pylist() == [10, 11, 12, 13] * 2
    assert table.column("is_member").to_pylist() == [False, True, False, True] * 2
    assert table.column(FRAGMENT).to_pylist() == [0] * 4 + [1] * 4
    assert table.schema.field(FRAGMENT).type == pa.int32()


def test_planning_with_digests_hashes_each_text_and_drops_it(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["é", " ", None, "x"]}), path)
    fragments = plan_fragments([str(path)], Columns(), [True])
    table = read_keys(fragments, Columns(), digests=True)
    assert table.column_names == ["id", ROW_INDEX, FILE_ROW, "is_member", TEXT_DIGEST, FRAGMENT]
    assert table.column(TEXT_DIGEST).to_pylist() == [
        hashlib.sha256("é".encode()).digest()[:16],
        None,
        None,
        hashlib.sha256(b"x").digest()[:16],
    ]
    assert table.column("is_member").to_pylist() == [True] * 4
    assert text_digests(pa.array([], pa.string())).type == pa.binary(16)


def test_ids_are_cast_to_the_unified_type(tmp_path):
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["a"], "id": pa.array([1], pa.int8())}), a)
    pq.write_table(pa.table({"text": ["b"], "id": pa.array([2], pa.uint16())}), b)
    columns = Columns("text", "id")
    fragments = plan_fragments([str(a), str(b)], columns)
    assert {f.id_type for f in fragments} == {"int64"}
    for fragment in fragments:
        table = read_fragment(fragment, columns)
        assert table.column_names == ["text", "id", ROW_INDEX, FILE_ROW]
        assert table.schema.field("id").type == pa.int64()
    (same,) = plan_fragments([str(a)], columns)
    assert read_fragment(same, columns).schema.field("id").type == pa.int8()


def test_texts_of_every_type_become_strings_and_bad_bytes_become_null():
    columns = Columns("t")
    for text in (
        pa.chunked_array([[b"ab", b"\xff", None]], pa.binary()),
        pa.chunked_array([[b"ab", b"\xff", None]], pa.large_binary()),
    ):
        table = pa.table({"t": text, ROW_INDEX: pa.array([0, 1, 2], pa.int64())})
        out = normalize(table, columns, "f")
        assert out.column("text").to_pylist() == ["ab", None, None]
        assert out.column("text").type == pa.string()
        undecodable = table.slice(1, 2)
        assert normalize(undecodable, columns, "f").column("text").type == pa.string()
    for text in (pa.array(["x"], pa.large_string()), pa.array(["x"]).dictionary_encode()):
        table = pa.table({"t": text, ROW_INDEX: pa.array([5], pa.int64())})
        out = normalize(table, columns, "f")
        assert out.column("text").type == pa.string() and out.column_names == [
            "id",
            "text",
            ROW_INDEX,
        ]
        assert out.column("id").to_pylist() == [5]


def test_first_member_and_nonmember_sharing_a_value():
    keys = pa.table(
        {
            "v": ["a", "b", None, "c", "b", None, "c", "a"],
            "is_member": [True, True, True, True, False, False, False, True],
        }
    )
    assert member_and_nonmember(keys, "v") == (1, 4)
    assert member_and_nonmember(keys.slice(0, 4), "v") is None
    nulls_only = pa.table({"v": [None, None, "x"], "is_member": [True, False, False]})
    assert member_and_nonmember(nulls_only, "v") is None


# --- bucket paths (pure path logic; listing and reading objects runs in test_datasets.py) --------


def test_paths_below_a_bucket_root_and_side_files():
    from ezmia.data.datasets import _relative, _side_file

    assert _relative("s3://b/root/x/y.parquet", "s3://b/root/") == "x/y.parquet"
    assert _relative("s3://b/root/x/y.parquet", "s3://b/root") == "x/y.parquet"
    assert _relative("s3://b/x/y.parquet", "s3://b") == "x/y.parquet"
    assert _relative("s3://b/x/y.parquet", "s3://b/") == "x/y.parquet"
    assert _relative("/data/root/x/y.parquet", "/data/root") == "x/y.parquet"
    assert _relative("s3://b/rootX/Xy.parquet", "s3://b/rootX/") == "Xy.parquet"
    side = ["", "x/", "a.parquet.crc", "x_$folder$", ".a.parquet", "d/.h/a.parquet",
            "_SUCCESS", "_tmp/a.parquet"]  # fmt: skip
    assert [_side_file(r) for r in side] == [True] * len(side)
    data = ["a.parquet", "_day=1/a.parquet", "d/e_f.parquet", "a.b/c.parquet"]
    assert [_side_file(r) for r in data] == [False] * len(data)


def test_a_bucket_object_on_both_sides_is_refused():
    from ezmia.data.datasets import _check_one_side

    seen: dict = {}
    _check_one_side("s3://b/a.parquet", True, "s3://b/", seen)
    _check_one_side("s3://b/a.parquet", True, "s3://b/a.parquet", seen)
    _check_one_side("s3://b/a.parquet", None, "s3://b/a.parquet", seen)
    assert seen == {"s3://b/a.parquet": (True, "s3://b/")}
    assert refusal(_check_one_side, "s3://b/a.parquet", False, "s3://b/a.parquet", seen) == (
        "s3://b/a.parquet: given as both --members (s3://b/) and --nonmembers "
        "(s3://b/a.parquet); a row is either a member or a non-member: give each file to one "
        "side only"
    )
    unlabelled: dict = {}
    _check_one_side("s3://b/a.parquet", None, "x", unlabelled)
    _check_one_side("s3://b/a.parquet", False, "y", unlabelled)
    assert unlabelled == {"s3://b/a.parquet": (None, "x")}


def test_reasons_are_one_short_line():
    from ezmia.errors import first_line

    assert first_line(OSError(), 300) == "OSError"
    assert first_line(ValueError("first line\nsecond"), 300) == "first line"
    assert first_line(ValueError("x" * 400), 300) == "x" * 300
    assert first_line(ValueError("x" * 400)) == "x" * 400


def test_unreadable_file_reasons_are_cut_to_300_characters(tmp_path, monkeypatch):
    path = write(tmp_path / "a.parquet", 4)
    fragment = plan_fragments([str(path)], LABELLED)[0]

    def fail(*args, **kwargs):
        raise OSError("x" * 400)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", fail)
    assert refusal(read_fragment, fragment, LABELLED) == (
        f"{path}: row group 0 is unreadable ({'x' * 300}); the file is corrupt, re-export it"
    )
    monkeypatch.setattr(storage, "arrow_filesystem", fail)
    assert refusal(plan_fragments, [str(path)], LABELLED) == (
        f"{path}: not a readable Parquet file ({'x' * 300}); re-export it"
    )


def test_labels_without_file_rows_name_the_position_and_fixed_labels_pass_through():
    table = pa.table({"t": ["a", "b"], "y": pa.array([1, 3], pa.int16()),
                      ROW_INDEX: pa.array([7, 8], pa.int64())})  # fmt: skip
    assert refusal(normalize, table, Columns("t", None, "y"), "f.parquet") == (
        "f.parquet: label column 'y' has value 3 at row 1; expected bool or 0/1 (1 = member)"
    )
    fixed = table.drop_columns(["y"]).append_column("__label", pa.array([True, True]))
    out = normalize(fixed, Columns("t"), "f")
    assert out.column_names == ["id", "text", ROW_INDEX, "is_member"]
    assert out.column("is_member").to_pylist() == [True, True]
    assert out.column("id").to_pylist() == [7, 8]
