"""The audit output location: ``scores/``, ``summary.json``, ``report.html``, ``_SUCCESS``.

``_SUCCESS`` is written last, so a location without it is never a finished report. A
finished location is refused unless overwriting; an unfinished one is cleared first.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ezmia import storage
from ezmia.errors import EzmiaError, InputError, OutputError

SUCCESS = "_SUCCESS"
SCORES_DIR = "scores"
SUMMARY = "summary.json"
REPORT = "report.html"


def is_complete(out: str) -> bool:
    return storage.exists(storage.join(out, SUCCESS))


def prepare(out: str, overwrite: bool) -> None:
    """Refuse a finished report unless ``overwrite``; clear any earlier, unfinished run."""
    if not storage.is_s3(out) and Path(out).is_file():
        raise OutputError(f"{out}: is a file, not a directory; choose another --out")
    try:
        complete = is_complete(out)
        if complete and not overwrite:
            raise OutputError(
                f"{out}: already holds a finished audit (_SUCCESS); pass --overwrite to replace "
                "it or choose another --out"
            )
        if storage.is_s3(out) or storage.list_files(out):
            if complete:
                storage.delete_prefix(storage.join(out, SUCCESS))
            storage.delete_prefix(out.rstrip("/") + "/")
    except EzmiaError:
        raise
    except Exception as err:
        raise OutputError(f"{out}: cannot prepare the output location ({err})") from err


@contextlib.contextmanager
def discard_on_error(out: str) -> Iterator[None]:
    """On any error inside the block, remove what the unfinished audit wrote under ``out``
    (best effort: the original error is what the user sees), so that no partial scores or
    summary outlive it. ``_SUCCESS`` is never written before the block ends."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            storage.delete_prefix(storage.join(out, SCORES_DIR) + "/")
            for name in (REPORT, SUMMARY):
                storage.delete(storage.join(out, name))
            if not storage.is_s3(out):
                with contextlib.suppress(OSError):
                    Path(out).rmdir()  # only when nothing else is left
        raise


def write_scores(
    out: str, table: pa.Table, encryption: storage.Encryption | None, part: int = 0
) -> str:
    """Write one Parquet part of the scores table; returns its URI."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(out, SCORES_DIR, f"part-{part:05d}.parquet")
    storage.write_bytes(uri, buffer.getvalue(), encryption)
    return uri


def read_scores(out: str) -> pa.Table:
    """Every scores part under ``out``, concatenated in source order."""
    files = [f for f in storage.list_files(storage.join(out, SCORES_DIR)) if f.endswith(".parquet")]
    if not files:
        raise InputError(f"{out}: no scores/*.parquet; is this an ezmia audit output?")
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in files]
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by("source_row")


def write_json(uri: str, data: dict, encryption: storage.Encryption | None) -> None:
    storage.write_bytes(uri, json.dumps(data, indent=2, default=str).encode(), encryption)


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def mark_success(out: str, encryption: storage.Encryption | None) -> None:
    storage.write_bytes(storage.join(out, SUCCESS), b"", encryption)
