"""The audit output location: ``scores/``, ``summary.json``, ``report.html``, ``_SUCCESS``, and
``_ezmia_manifest.json``, the list of every file the audit wrote there.

ezmia deletes or replaces only what it wrote: the files its manifest lists (and, for outputs
of ezmia versions before manifests, files named exactly as an audit names them). A location
that holds anything else is refused, as are an empty ``--out``, a filesystem or bucket root
and any location that contains or lies inside an input. One audit at a time writes to a
location (``_ezmia.lock``, renewed while it runs). ``_SUCCESS`` is written last, so a location
without it is never a finished report; a finished one is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ezmia.data import storage
from ezmia.data.locks import LockHeld, Locks
from ezmia.errors import OutputError

SUCCESS = "_SUCCESS"
SCORES_DIR = "scores"
SUMMARY = "summary.json"
REPORT = "report.html"
MANIFEST = "_ezmia_manifest.json"
LOCK = "_ezmia.lock"
LOCK_TTL_S = 600.0  # a holder that stopped renewing for this long is taken over
_PART = re.compile(rf"{SCORES_DIR}/part-\d{{5,}}\.parquet")  # numbered by index or first row
_TEMP = re.compile(r"(?:.*/)?\.(?P<name>[^/]+)\.tmp-\d+")  # storage.write_bytes' temp files


def part_name(index: int) -> str:
    """The name of the ``index``-th scores part, relative to the output location."""
    return f"{SCORES_DIR}/part-{index:05d}.parquet"


def is_complete(out: str) -> bool:
    return storage.exists(storage.join(out, SUCCESS))


def _segments(uri: str) -> tuple[str, ...]:
    """A location as comparable path segments (symlinks resolved locally)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return ("s3:", bucket, *[p for p in key.split("/") if p])
    return Path(os.path.realpath(os.path.expanduser(uri))).parts


def check_location(out: str, inputs: Mapping[str, list[str]]) -> None:
    """Refuse an empty ``--out``, a filesystem or bucket root, and an ``--out`` that contains
    or lies inside an input (``inputs`` maps the flag naming them to their locations)."""
    if not out.strip():
        raise OutputError("--out is empty (an unset variable?); give an output directory or prefix")
    where = _segments(out)
    if storage.is_s3(out) and len(where) < 3:
        raise OutputError(f"--out {out}: a bucket root; give a prefix such as {out}/audits/NAME")
    if not storage.is_s3(out) and (len(where) < 2 or os.path.ismount(os.path.join(*where))):
        raise OutputError(f"--out {out}: a filesystem root; give a dedicated output directory")
    if not storage.is_s3(out) and Path(out).is_file():
        raise OutputError(f"--out {out}: is a file, not a directory; choose another --out")
    for flag, uris in inputs.items():
        for uri in uris:
            other = _segments(uri)
            if where[: len(other)] == other or other[: len(where)] == where:
                inside = {-1: "contains", 0: "is", 1: "lies inside"}[
                    (len(where) > len(other)) - (len(where) < len(other))
                ]
                raise OutputError(
                    f"--out {out}: {inside} {flag} {uri}; an audit never writes where its "
                    "inputs are: choose a separate output location"
                )


def _entries(out: str) -> set[str]:
    """Everything under ``out`` as relative paths: files, links, and empty folders (``x/``)."""
    if storage.is_s3(out):
        prefix = out.rstrip("/") + "/"
        return {u[len(prefix) :] for u in storage.list_files(prefix) if u != prefix}
    root = Path(out)
    if not root.exists():
        return set()
    if not root.is_dir():
        raise OutputError(f"--out {out}: is a file, not a directory; choose another --out")
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root)
        for name in dirs:
            path = Path(folder, name)
            if path.is_symlink() or not any(path.iterdir()):
                found.add(f"{(here / name).as_posix()}/")
        found.update((here / name).as_posix() for name in files)
    return found


def _read_manifest(out: str, entries: set[str]) -> set[str] | None:
    """The files the manifest says ezmia wrote; ``None`` when there is no manifest."""
    if MANIFEST not in entries:
        return None
    try:
        files = json.loads(storage.read_bytes(storage.join(out, MANIFEST)))["files"]
        strange = [f for f in files if not (isinstance(f, str) and _is_audit_file(f))]
        if strange:
            raise ValueError(f"{strange[0]!r} is not a file an audit writes")
    except (ValueError, KeyError, TypeError) as err:
        raise OutputError(
            f"--out {out}: unreadable ezmia manifest {MANIFEST} ({err}); ezmia cannot "
            "tell its own files from others there: choose another --out"
        ) from err
    return set(files)


def _is_audit_file(name: str) -> bool:
    """Whether ``name`` (relative to the output location) is one an audit writes."""
    return name in (SUMMARY, REPORT, SUCCESS) or bool(_PART.fullmatch(name))


def _owned(out: str, entries: set[str]) -> set[str]:
    """The entries ezmia wrote: those its manifest lists (with their leftover temp files), or
    for an output older than manifests, files named as an audit names them."""
    listed = _read_manifest(out, entries)
    if listed is None:
        legacy = {e for e in entries if _is_audit_file(e)}
        return legacy if any(_PART.fullmatch(e) for e in legacy) else set()
    listed.add(MANIFEST)
    temps = set()
    for entry in entries:
        temp = _TEMP.fullmatch(entry)
        if temp and str(Path(entry).parent / temp["name"]).removeprefix("./") in listed:
            temps.add(entry)
    return (entries & listed) | temps


def _owned_and_foreign(out: str) -> tuple[set[str], list[str]]:
    """What ezmia wrote at ``out``, and everything else there (its locks aside), sorted."""
    entries = _entries(out) - {LOCK}
    entries = {e for e in entries if not e.startswith(f"{LOCK}.")}  # a lock being released
    owned = _owned(out, entries)
    return owned, sorted(entries - owned)


def foreign_files(out: str) -> list[str]:
    """The entries at ``out`` that ezmia did not write (by its manifest), sorted."""
    return _owned_and_foreign(out)[1]


def _survey(out: str, overwrite: bool) -> set[str]:
    """What ezmia wrote at ``out``; refuses a location holding anything else, and a finished
    audit unless ``overwrite``."""
    owned, foreign = _owned_and_foreign(out)
    if foreign:
        raise OutputError(
            f"--out {out}: holds {len(foreign)} file(s) ezmia did not write (e.g. {foreign[0]}); "
            "ezmia writes only to an empty or new location, or over its own earlier audit: "
            "choose another --out"
        )
    if SUCCESS in owned and not overwrite:
        raise OutputError(
            f"--out {out}: already holds a finished audit (_SUCCESS); pass --overwrite to replace "
            "it or choose another --out"
        )
    return owned


@dataclass
class Output:
    """An output location being written: every name is recorded in the manifest before its
    file is written, so what a run wrote can always be found and removed again."""

    uri: str
    encryption: storage.Encryption | None
    files: set[str] = field(default_factory=set)

    def claim(self, *names: str) -> None:
        """Record ``names`` in the manifest (before they are written)."""
        if set(names) <= self.files:
            return
        self.files.update(names)
        body = json.dumps({"written_by": "ezmia", "files": sorted(self.files)}, indent=1)
        storage.write_bytes(storage.join(self.uri, MANIFEST), body.encode(), self.encryption)

    def write(self, name: str, data: bytes) -> str:
        """Write one file of the audit; returns its URI."""
        self.claim(name)
        uri = storage.join(self.uri, name)
        storage.write_bytes(uri, data, self.encryption)
        return uri

    def write_part(self, index: int, table: pa.Table) -> str:
        """Write the ``index``-th scores part."""
        self.claim(part_name(index))
        return write_scores(self.uri, table, self.encryption, index)

    def remove(self, names: set[str]) -> None:
        """Delete ``names`` (and folders they leave empty locally)."""
        for name in sorted(names, key=lambda n: n == MANIFEST):  # the manifest goes last
            storage.delete(storage.join(self.uri, name))
        if not storage.is_s3(self.uri):
            with contextlib.suppress(OSError):
                Path(self.uri, SCORES_DIR).rmdir()  # only when nothing else is left


@contextlib.contextmanager
def locked(out: str, holder: str, encryption: storage.Encryption | None) -> Iterator[None]:
    """Hold the location's lock (renewed while the block runs); a second writer is refused
    with one line naming the holder."""
    locks = Locks(out, {"holder": holder}, LOCK_TTL_S, encryption or storage.Encryption())
    try:
        lock = locks.acquire_at(storage.join(out, LOCK), out=out)
    except LockHeld as held:
        raise OutputError(f"--out {out}: {held}; wait for it or choose another --out") from held
    with locks.held(lock):
        yield


@contextlib.contextmanager
def open_output(
    out: str, *, overwrite: bool, encryption: storage.Encryption | None, holder: str
) -> Iterator[Output]:
    """The output location, locked for this run and cleared of ezmia's earlier files. On any
    error inside the block, what this run wrote is removed again (and a folder it created)."""
    _survey(out, overwrite)  # refuse before writing anything, even a lock
    created = not storage.is_s3(out) and not Path(out).exists()
    failed = False
    try:
        with locked(out, holder, encryption):
            output = Output(out, encryption)
            output.remove(_survey(out, overwrite))  # an earlier run's files, ours to replace
            try:
                output.claim(SUMMARY, REPORT)
                yield output
            except BaseException:
                failed = True
                with contextlib.suppress(Exception):  # the original error is what counts
                    output.remove(output.files | {MANIFEST})
                raise
    finally:
        if failed and created:
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # only when nothing else is left


def part_files(out: str) -> list[str]:
    """The scores parts of an audit: those its manifest lists (every ``scores/part-*`` of an
    output older than manifests), in name order."""
    entries = _entries(out)
    listed = _read_manifest(out, entries)
    parts = entries if listed is None else entries & listed
    return sorted(storage.join(out, e) for e in parts if _PART.fullmatch(e))


def write_scores(
    out: str, table: pa.Table, encryption: storage.Encryption | None, part: int = 0
) -> str:
    """Write one Parquet part of the scores table (a name ``Output.claim`` recorded)."""
    uri = storage.join(out, part_name(part))
    storage.write_parquet(uri, table, encryption)
    return uri
