"""Reading audit datasets from Parquet files, directories or prefixes, local or on S3.

A dataset is planned as fragments (one Parquet row group each, with its global row offset)
so the local engine and the Ray engine read the same rows with the same default ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ezmia import storage
from ezmia.errors import InputError

ROW_INDEX = "__row_index"
FILE_ROW = "__file_row"


@dataclass(frozen=True)
class Columns:
    """Which source columns hold the text, the id and the membership label."""

    text: str = "text"
    id: str | None = None
    label: str | None = None

    def needed(self) -> list[str]:
        return [c for c in (self.text, self.id, self.label) if c]


@dataclass(frozen=True)
class Fragment:
    """One row group of one Parquet file; ``offset`` is its first row's index in the dataset,
    ``file_offset`` its first row's index in its file (for error messages)."""

    uri: str
    row_group: int
    offset: int
    num_rows: int
    label: bool | None = None
    file_offset: int = 0


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a file, directory or prefix, in sorted order."""
    with storage.s3_errors(uri, "list the dataset"):
        files = storage.list_files(uri)
    if not files:
        raise InputError(f"{uri}: no such file, directory or prefix (check the dataset path)")
    parquet = [f for f in files if f.endswith((".parquet", ".parq")) or f == uri]
    if not parquet:
        raise InputError(
            f"{uri}: no Parquet files found (expected *.parquet under this path; found e.g. "
            f"{files[0]})"
        )
    return parquet


def _reason(err: Exception) -> str:
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__


def _open(uri: str) -> pq.ParquetFile:
    with storage.s3_errors(uri, "read"):
        fs, path = storage.arrow_filesystem(uri)
        try:
            return pq.ParquetFile(fs.open_input_file(path))
        except FileNotFoundError as err:
            raise InputError(f"{uri}: file not found") from err
        except (OSError, pa.ArrowException) as err:
            if storage.describe_s3_error(err) is not None:
                raise
            raise InputError(
                f"{uri}: not a readable Parquet file ({_reason(err)}); re-export it"
            ) from err


def check_schema(uri: str, schema: pa.Schema, columns: Columns) -> None:
    """Refuse missing columns and columns of the wrong type, naming file and column."""
    for name in columns.needed():
        if name not in schema.names:
            raise InputError(
                f"{uri}: no column {name!r} (columns: {', '.join(schema.names)}); "
                "choose it with --text-column/--id-column/--label-column"
            )
    text_type = schema.field(columns.text).type
    if not (
        pa.types.is_string(text_type)
        or pa.types.is_large_string(text_type)
        or pa.types.is_binary(text_type)
        or pa.types.is_large_binary(text_type)
    ):
        raise InputError(
            f"{uri}: text column {columns.text!r} has type {text_type}, expected string; "
            "choose the text column with --text-column"
        )
    if columns.label:
        label_type = schema.field(columns.label).type
        if not (pa.types.is_boolean(label_type) or pa.types.is_integer(label_type)):
            raise InputError(
                f"{uri}: label column {columns.label!r} has type {label_type}, expected bool or 0/1"
            )


def plan_fragments(
    uris: list[str], columns: Columns, labels: list[bool | None] | None = None
) -> list[Fragment]:
    """Fragments of one or more datasets, in source order, with global row offsets.

    ``labels`` gives a fixed membership label per dataset (members / non-members files).
    """
    fragments: list[Fragment] = []
    offset = 0
    first_id: tuple[str, pa.Field] | None = None
    for dataset_index, uri in enumerate(uris):
        label = labels[dataset_index] if labels else None
        for file in parquet_files(uri):
            meta = _open(file)
            check_schema(file, meta.schema_arrow, columns)
            if columns.id:
                field = meta.schema_arrow.field(columns.id)
                first_id = first_id or (file, field)
                _check_same_id_type(first_id, (file, field))
            file_offset = 0
            for group in range(meta.metadata.num_row_groups):
                rows = meta.metadata.row_group(group).num_rows
                fragments.append(Fragment(file, group, offset, rows, label, file_offset))
                offset += rows
                file_offset += rows
    return fragments


def _check_same_id_type(first: tuple[str, pa.Field], other: tuple[str, pa.Field]) -> None:
    """Ids of every file must share one type, or they cannot form one id column."""
    try:
        pa.unify_schemas(
            [pa.schema([first[1]]), pa.schema([other[1]])], promote_options="permissive"
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise InputError(
            f"{other[0]}: id column {other[1].name!r} has type {other[1].type} but {first[0]} "
            f"has {first[1].type}; give every file the same id type"
        ) from err


def read_fragment(fragment: Fragment, columns: Columns, with_text: bool = True) -> pa.Table:
    """The fragment's needed columns (without the text unless ``with_text``), plus its global
    row index, its rows' index in the file and its fixed label if any."""
    names = columns.needed() if with_text else [c for c in (columns.id, columns.label) if c]
    file = _open(fragment.uri)
    try:
        with storage.s3_errors(fragment.uri, "read"):
            table = file.read_row_group(fragment.row_group, columns=names)
    except (OSError, pa.ArrowException) as err:
        raise InputError(
            f"{fragment.uri}: row group {fragment.row_group} is unreadable ({_reason(err)}); "
            "the file is corrupt, re-export it"
        ) from err
    index = pa.array(range(fragment.offset, fragment.offset + table.num_rows), pa.int64())
    table = table.append_column(ROW_INDEX, index)
    start = fragment.file_offset
    table = table.append_column(
        FILE_ROW, pa.array(range(start, start + table.num_rows), pa.int64())
    )
    if fragment.label is not None:
        table = table.append_column("__label", pa.array([fragment.label] * table.num_rows))
    return table


def normalize(table: pa.Table, columns: Columns, source: str) -> pa.Table:
    """The canonical columns ``id``, ``text`` (when read), ``is_member`` (when labelled)."""
    ids = table.column(columns.id) if columns.id else table.column(ROW_INDEX)
    out = {"id": ids, ROW_INDEX: table.column(ROW_INDEX)}
    if columns.text in table.column_names:
        text = table.column(columns.text)
        if pa.types.is_binary(text.type) or pa.types.is_large_binary(text.type):
            text = pa.array([_decode(v) for v in text.to_pylist()], pa.string())
        out = {"id": ids, "text": text, ROW_INDEX: table.column(ROW_INDEX)}
    if FILE_ROW in table.column_names:
        out[FILE_ROW] = table.column(FILE_ROW)
    if columns.label:
        rows = table.column(FILE_ROW) if FILE_ROW in table.column_names else None
        out["is_member"] = labels_to_bool(table.column(columns.label), columns.label, source, rows)
    elif "__label" in table.column_names:
        out["is_member"] = table.column("__label")
    return pa.table(out)


def _decode(value: bytes | None) -> str | None:
    """Undecodable bytes become a null text (the row is then reported as ``empty``)."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def labels_to_bool(
    column: pa.ChunkedArray, name: str, source: str, rows: pa.ChunkedArray | None = None
) -> pa.ChunkedArray:
    """Bool or 0/1 labels as bool; anything else names the first bad row (of the file,
    when ``rows`` gives each value's row in ``source``)."""

    def at(index: int) -> int:
        return int(rows[index].as_py()) if rows is not None else index

    if column.null_count:
        row = column.to_pylist().index(None)
        raise InputError(
            f"{source}: label column {name!r} is null at row {at(row)}; set every label "
            "(true/1 = member, false/0 = non-member)"
        )
    if pa.types.is_boolean(column.type):
        return column
    bad = pc.invert(pc.is_in(column, pa.array([0, 1], column.type)))
    if pc.any(bad).as_py():
        row = bad.to_pylist().index(True)
        raise InputError(
            f"{source}: label column {name!r} has value {column[row].as_py()!r} at row "
            f"{at(row)}; "
            "expected bool or 0/1 (1 = member)"
        )
    return pc.equal(column, 1)


def read_dataset(
    uris: list[str], columns: Columns, labels: list[bool | None] | None = None
) -> pa.Table:
    """Every row of the datasets as ``id``, ``text``, ``is_member`` columns (local engine)."""
    fragments = plan_fragments(uris, columns, labels)
    tables = [normalize(read_fragment(f, columns), columns, f.uri) for f in fragments]
    if not tables:
        raise InputError(f"{', '.join(uris)}: the dataset has no rows")
    return pa.concat_tables(tables, promote_options="permissive")
