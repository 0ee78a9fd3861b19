"""Reading audit datasets from Parquet files, directories or prefixes, local or on S3.

A dataset is planned as fragments (one non-empty Parquet row group each, with its global row
offset) so the local engine and the Ray engine read the same rows with the same default ids.
Planning lists the data files (skipping what Spark, Hadoop and S3 consoles leave beside
them), checks every file's schema and unifies the id type across files, so every fragment
is read in the same types.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ezmia.data import storage
from ezmia.errors import InputError, first_line

ROW_INDEX = "__row_index"
FILE_ROW = "__file_row"
FRAGMENT = "__fragment"
TEXT_DIGEST = "__text_digest"
DIGEST_BYTES = 16
"""Text digests keep the first 128 bits of SHA-256: collisions are out of reach (about
n**2 / 2**129 for n rows) at half the memory."""
_STRINGS = (pa.string(), pa.large_string())
_BINARIES = (pa.binary(), pa.large_binary())


@dataclass(frozen=True)
class Columns:
    """Which source columns hold the text, the id and the membership label."""

    text: str = "text"
    id: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.id is None or self.id not in (self.text, self.label):
            return
        clash = "label column"
        if self.id == self.text:
            clash = "text column: ids are copied into the scores and the report, texts are private"
        raise InputError(
            f"--id-column {self.id!r} is also the {clash}; choose another --id-column, or drop "
            "it to number rows by position"
        )

    def needed(self) -> list[str]:
        return [c for c in (self.text, self.id, self.label) if c]


@dataclass(frozen=True)
class Fragment:
    """One row group of one Parquet file; ``offset`` is its first row's index in the dataset,
    ``file_offset`` its first row's index in its file (for error messages), ``id_type`` the
    id type unified across the dataset's files (every fragment's ids are cast to it)."""

    uri: str
    row_group: int
    offset: int
    num_rows: int
    label: bool | None = None
    file_offset: int = 0
    id_type: str | None = None


def _side_file(relative: str) -> bool:
    """Whether a path below a dataset root is something tools leave beside the data, as
    Spark's reader sees it: a ``.*`` name or a ``_*`` name that is not a partition
    (``_SUCCESS``, ``_committed_*``, ``_temporary/``, ``._part-0.parquet``, ``.hidden/``; but
    ``_day=1/`` is data) at any depth, a ``*.crc`` checksum or an S3 folder marker
    (``prefix/``, ``x_$folder$``)."""
    return (
        not relative
        or relative.endswith(("/", ".crc", "_$folder$"))
        or any(
            p.startswith(".") or (p.startswith("_") and "=" not in p) for p in relative.split("/")
        )
    )


def _relative(file: str, root: str) -> str:
    """``file``'s path below the dataset root, ``/``-separated."""
    if storage.is_s3(root):
        root_key = storage.split_s3(root)[1].rstrip("/")
        key = storage.split_s3(file)[1]
        return key[len(root_key) :].lstrip("/") if root_key else key
    return Path(file).relative_to(Path(root)).as_posix()


def dataset_files(uri: str) -> tuple[list[str], bool]:
    """The Parquet files of a dataset path, sorted, and whether ``uri`` names one file.

    A file named by the user is read as given. Under a directory or prefix, only
    ``*.parquet``/``*.parq`` files count, and side files (see ``_side_file``) are skipped.
    """
    files = storage.list_files(uri)  # S3 failures: one line from list_files itself
    if not files:
        raise InputError(f"{uri}: no such file, directory or prefix (check the dataset path)")
    explicit = (
        Path(uri).is_file() if not storage.is_s3(uri) else files == [uri] and not uri.endswith("/")
    )
    if explicit:
        return files, True
    visible = [f for f in files if not _side_file(_relative(f, uri))]
    parquet = [f for f in visible if f.endswith((".parquet", ".parq"))]
    if not parquet:
        example = (visible or files)[0]
        raise InputError(
            f"{uri}: no Parquet files found (expected *.parquet under this path; found e.g. "
            f"{example}{'' if visible else ', which Spark, Hadoop or S3 leave beside data'})"
        )
    return parquet, False


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """Turn a missing or unreadable Parquet file into an ``InputError`` naming it."""
    with storage.s3_errors(uri, "read"):
        try:
            yield
        except FileNotFoundError as err:
            raise InputError(f"{uri}: file not found") from err
        except (OSError, pa.ArrowException) as err:
            if storage.describe_s3_error(err) is not None:
                raise
            raise InputError(
                f"{uri}: not a readable Parquet file ({first_line(err, 300)}); re-export it"
            ) from err


def _open(uri: str) -> pq.ParquetFile:
    with _reading(uri):
        fs, path = storage.arrow_filesystem(uri)
        return pq.ParquetFile(fs.open_input_file(path))


def _footer(uri: str, skip_empty: bool) -> pq.FileMetaData | None:
    """The Parquet footer of ``uri``, without keeping the file open; ``None`` for a 0-byte
    file when ``skip_empty``."""
    with _reading(uri):
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as source:
            return None if skip_empty and not source.size() else pq.read_metadata(source)


def _value_type(data_type: pa.DataType) -> pa.DataType:
    """The type of the values (a dictionary-encoded column's value type)."""
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def _is_text(data_type: pa.DataType) -> bool:
    return _value_type(data_type) in _STRINGS + _BINARIES


def _id_kind(data_type: pa.DataType) -> str | None:
    """``integer`` or ``string`` for the id types ezmia accepts, else ``None``."""
    value = _value_type(data_type)
    if pa.types.is_integer(value):
        return "integer"
    if value in _STRINGS:
        return "string"
    return None


def check_schema(uri: str, schema: pa.Schema, columns: Columns) -> None:
    """Refuse missing columns and columns of the wrong type, naming file and column."""
    for name in columns.needed():
        if name not in schema.names:
            raise InputError(
                f"{uri}: no column {name!r} (columns: {', '.join(schema.names)}); "
                "choose it with --text-column/--id-column/--label-column"
            )
    text_type = schema.field(columns.text).type
    if not _is_text(text_type):
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


def unify_id_types(types: list[tuple[str, pa.DataType]], column: str) -> pa.DataType:
    """The one id type of a dataset's files (``(file, type)`` pairs, at least one): integer
    or string ids only; integers of different widths become int64 (uint64 only if every file
    is unsigned), string and large_string become large_string. Anything else is refused
    naming the files, the column and the types."""
    good = [(f, t) for f, t in types if _id_kind(t)]
    for file, data_type in types:
        if not _id_kind(data_type):
            other = f"; {good[0][0]} has {good[0][1]}" if good else ""
            raise InputError(
                f"{file}: id column {column!r} has type {data_type}, but ids must be integers "
                f"or strings{other}: cast the id column to int64 or string in every file, or "
                "drop --id-column to number rows by position"
            )
    first_file, first = types[0]
    for file, data_type in types[1:]:
        if _id_kind(data_type) != _id_kind(first):
            raise InputError(
                f"{file}: id column {column!r} has type {data_type} but {first_file} has "
                f"{first}; give every file the same id type (cast to int64 or string)"
            )
    values = {_value_type(t) for _, t in types}
    if len(values) == 1:
        return values.pop()
    if _id_kind(first) == "string":
        return pa.large_string()
    if pa.uint64() in values and not all(pa.types.is_unsigned_integer(t) for t in values):
        wide = next(f for f, t in types if _value_type(t) == pa.uint64())
        signed = next(f for f, t in types if pa.types.is_signed_integer(_value_type(t)))
        raise InputError(
            f"{wide}: id column {column!r} has type uint64 but {signed} has signed integers; "
            "give every file the same id type (cast to int64 or string)"
        )
    return pa.uint64() if pa.uint64() in values else pa.int64()


def plan_fragments(
    uris: list[str], columns: Columns, labels: list[bool | None] | None = None
) -> list[Fragment]:
    """Fragments of one or more datasets, in source order, with global row offsets.

    ``labels`` gives a fixed membership label per dataset (members / non-members files); a
    file reached from both a member and a non-member dataset is refused. Under a directory
    or prefix, 0-byte and 0-row files are skipped; 0-row row groups never make fragments.
    """
    opened: list[tuple[str, pq.FileMetaData, bool | None]] = []
    seen: dict[str, tuple[bool | None, str]] = {}
    for dataset_index, uri in enumerate(uris):
        label = labels[dataset_index] if labels else None
        files, explicit = dataset_files(uri)
        kept = 0
        for file in files:
            _check_one_side(file, label, uri, seen)
            meta = _footer(file, skip_empty=not explicit)
            if meta is None or (not explicit and meta.num_rows == 0):
                continue
            check_schema(file, meta.schema.to_arrow_schema(), columns)
            opened.append((file, meta, label))
            kept += 1
        if not kept:
            raise InputError(
                f"{uri}: every Parquet file under this path is empty (0 bytes or 0 rows); "
                "point at the folder that holds the data"
            )
    id_type = None
    if columns.id and (with_rows := [(f, m) for f, m, _ in opened if m.num_rows]):
        types = [(f, m.schema.to_arrow_schema().field(columns.id).type) for f, m in with_rows]
        id_type = str(unify_id_types(types, columns.id))
    fragments: list[Fragment] = []
    offset = 0
    for file, meta, label in opened:
        file_offset = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if rows:
                fragments.append(Fragment(file, group, offset, rows, label, file_offset, id_type))
            offset += rows
            file_offset += rows
    return fragments


_SIDE_FLAGS = {True: "--members", False: "--nonmembers"}


def _check_one_side(
    file: str, label: bool | None, uri: str, seen: dict[str, tuple[bool | None, str]]
) -> None:
    """Refuse a file reached from both a member and a non-member dataset (the same path
    twice, or a file and the folder holding it)."""
    key = file if storage.is_s3(file) else str(Path(file).resolve())
    first_label, first_uri = seen.setdefault(key, (label, uri))
    if label is not None and first_label not in (None, label):
        raise InputError(
            f"{file}: given as both {_SIDE_FLAGS[first_label]} ({first_uri}) and "
            f"{_SIDE_FLAGS[label]} ({uri}); a row is either a member or a non-member: give "
            "each file to one side only"
        )


def read_fragment(fragment: Fragment, columns: Columns, with_text: bool = True) -> pa.Table:
    """The fragment's needed columns (without the text unless ``with_text``; ids in the
    dataset's unified id type), plus its global row index, its rows' index in the file and
    its fixed label if any."""
    names = columns.needed() if with_text else [c for c in (columns.id, columns.label) if c]
    file = _open(fragment.uri)
    try:
        with storage.s3_errors(fragment.uri, "read"):
            table = file.read_row_group(fragment.row_group, columns=names)
    except (OSError, pa.ArrowException) as err:
        raise InputError(
            f"{fragment.uri}: row group {fragment.row_group} is unreadable "
            f"({first_line(err, 300)}); the file is corrupt, re-export it"
        ) from err
    if columns.id and fragment.id_type:
        id_type = pa.type_for_alias(fragment.id_type)
        if table.schema.field(columns.id).type != id_type:
            position = table.schema.get_field_index(columns.id)
            table = table.set_column(position, columns.id, table.column(columns.id).cast(id_type))
    for name, start in ((ROW_INDEX, fragment.offset), (FILE_ROW, fragment.file_offset)):
        rows = pa.array(range(start, start + table.num_rows), pa.int64())
        table = table.append_column(name, rows)
    if fragment.label is not None:
        table = table.append_column("__label", pa.array([fragment.label] * table.num_rows))
    return table


def normalize(table: pa.Table, columns: Columns, source: str) -> pa.Table:
    """The canonical columns ``id``, ``text`` (when read, always as string), ``is_member``
    (when labelled)."""
    out = {"id": table.column(columns.id) if columns.id else table.column(ROW_INDEX)}
    if columns.text in table.column_names:
        out["text"] = _as_string(table.column(columns.text))
    out[ROW_INDEX] = table.column(ROW_INDEX)
    if FILE_ROW in table.column_names:
        out[FILE_ROW] = table.column(FILE_ROW)
    if columns.label:
        label = table.column(columns.label)
        out["is_member"] = labels_to_bool(label, columns.label, source, out.get(FILE_ROW))
    elif "__label" in table.column_names:
        out["is_member"] = table.column("__label")
    return pa.table(out)


def _as_string(text: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Texts as UTF-8 strings, whatever their column type (string, large_string, binary or
    dictionary-encoded)."""
    if pa.types.is_dictionary(text.type):
        text = text.cast(text.type.value_type)
    if text.type in _BINARIES:
        return pa.array([_decode(v) for v in text.to_pylist()], pa.string())
    return text if text.type == pa.string() else text.cast(pa.string())


def _decode(value: bytes | None) -> str | None:
    """Undecodable bytes become a null text (the row is then reported as ``empty``)."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_digests(texts: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The first ``DIGEST_BYTES`` of each text's SHA-256 (of its UTF-8 bytes); null for a
    null or blank text (it scores as ``empty``, so it cannot tell members apart)."""
    return pa.array(
        [
            hashlib.sha256(t.encode("utf-8")).digest()[:DIGEST_BYTES] if t and t.strip() else None
            for t in texts.to_pylist()
        ],
        pa.binary(DIGEST_BYTES),
    )


def read_keys(
    fragments: list[Fragment],
    columns: Columns,
    digests: bool,
    observe: Callable[[pa.Table], None] | None = None,
) -> pa.Table:
    """Ids, labels, file rows and fragment indexes of every row (with ``digests``, plus each
    text's digest), read one fragment at a time so no text is ever held beyond its fragment;
    ``observe`` sees each fragment's rows, texts included, before they are dropped."""
    tables = []
    for index, fragment in enumerate(fragments):
        rows = normalize(read_fragment(fragment, columns, with_text=digests), columns, fragment.uri)
        if observe is not None:
            observe(rows)
        if digests:
            rows = rows.append_column(TEXT_DIGEST, text_digests(rows.column("text")))
            rows = rows.drop_columns(["text"])
        tables.append(rows.append_column(FRAGMENT, pa.array([index] * rows.num_rows, pa.int32())))
    return pa.concat_tables(tables)


def member_and_nonmember(keys: pa.Table, column: str) -> tuple[int, int] | None:
    """The first member row (in source order) whose non-null ``column`` value a non-member
    row also has, and the first such non-member row; ``None`` when the classes share none."""
    values, member = keys.column(column), keys.column("is_member")
    nonmember_values = pc.drop_null(pc.filter(values, pc.invert(member))).combine_chunks()
    shared = pc.and_(member, pc.is_in(values, value_set=nonmember_values, skip_nulls=True))
    if not pc.any(shared).as_py():
        return None
    first = pc.indices_nonzero(shared)[0].as_py()
    other = pc.and_(pc.invert(member), pc.equal(values, values[first]))
    return first, pc.indices_nonzero(other)[0].as_py()


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
            f"{at(row)}; expected bool or 0/1 (1 = member)"
        )
    return pc.equal(column, 1)
