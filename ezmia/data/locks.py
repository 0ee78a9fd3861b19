"""Lock objects, so that two writers never work on the same thing at once: one per output
location (``OUT/_ezmia.lock``, held by every audit) and one per checkpoint of a scan
(``OUT/locks/<key>.lock``).

A lock is created atomically: on S3 with a conditional put (``IfNoneMatch="*"``), locally
with ``os.open(O_CREAT | O_EXCL)``. A lock older than the TTL, or one left on this host by a
process that no longer runs, is stale and taken over atomically: on S3 with a put
conditional on the stale lock's ETag (``IfMatch``); locally by renaming it aside, checking
it is still the lock judged stale, and creating a fresh one with ``O_EXCL``. Release deletes
the lock only while it is still ours (``IfMatch`` on S3, the same rename check locally).
While work runs, a heartbeat thread renews the lock (a conditional re-put on S3, a new
modification time locally), so the TTL bounds how long a *dead* holder blocks others, not how
long an audit may run.

Conditional writes are atomic on AWS S3 (``IfNoneMatch`` since 2024-08, ``IfMatch`` puts
since 2024-11). moto 5.2.5 honours ``IfNoneMatch="*"`` and ``IfMatch`` on put and delete,
but checks and writes without a lock, so it is not a proof of atomicity under load.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ezmia.data import storage

log = logging.getLogger(__name__)
HOST = socket.gethostname()


class LockHeld(Exception):
    """Another live process holds the lock; the message says which and since when."""


@dataclass
class Lock:
    uri: str
    tag: str  # S3: the lock object's ETag; local: the token written into the lock file
    body: dict


@dataclass(frozen=True)
class Found:
    """A lock as it is now: its tag, age in seconds and owner record."""

    tag: str
    age_s: float
    owner: dict


class LocalLocks:
    """Lock files on a local (or shared POSIX) file system."""

    def create(self, uri: str, body: dict) -> str | None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle)
        return body["token"]

    def find(self, uri: str) -> Found | None:
        try:
            owner = _parse(Path(uri).read_bytes())
            age = time.time() - Path(uri).stat().st_mtime
        except FileNotFoundError:
            return None
        return Found(owner.get("token", ""), age, owner)

    def replace(self, uri: str, tag: str, body: dict) -> str | None:
        return self.create(uri, body) if self.delete(uri, tag) else None

    def renew(self, uri: str, tag: str, body: dict) -> str | None:
        """Touch the lock while it still carries ``tag``; ``None`` when it is no longer ours."""
        found = self.find(uri)
        if found is None or found.tag != tag:
            return None
        os.utime(uri)
        return tag

    def delete(self, uri: str, tag: str) -> bool:
        """Remove the lock only if it still carries ``tag`` (put back any other lock)."""
        aside = Path(f"{uri}.{uuid.uuid4().hex}.aside")
        try:
            os.rename(uri, aside)
        except FileNotFoundError:
            return False
        if _parse(aside.read_bytes()).get("token", "") == tag:
            aside.unlink()
            return True
        try:
            os.link(aside, uri)  # not ours: restore it unless a new lock already took its place
        except FileExistsError:
            log.warning("%s: a newer lock replaced one being restored", uri)
        aside.unlink()
        return False


class S3Locks:
    """Lock objects in S3, created and replaced with conditional puts."""

    def __init__(self, encryption: storage.Encryption) -> None:
        self.extra = encryption.put_args()

    def create(self, uri: str, body: dict) -> str | None:
        return self._put(uri, body, IfNoneMatch="*")

    def find(self, uri: str) -> Found | None:
        bucket, key = storage.split_s3(uri)
        try:
            got = storage.s3_client().get_object(Bucket=bucket, Key=key)
        except storage.s3_client().exceptions.NoSuchKey:
            return None
        age = (dt.datetime.now(dt.timezone.utc) - got["LastModified"]).total_seconds()
        return Found(got["ETag"], age, _parse(got["Body"].read()))

    def replace(self, uri: str, tag: str, body: dict) -> str | None:
        """Re-put the lock while it still carries ``tag``; returns its new ETag."""
        return self._put(uri, body, IfMatch=tag)

    renew = replace  # renewing re-puts the lock under the same condition

    def delete(self, uri: str, tag: str) -> bool:
        bucket, key = storage.split_s3(uri)
        client = storage.s3_client()
        try:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=tag)
        except client.exceptions.ClientError as err:
            if _lost_race(err):
                return False
            if storage.s3_code(err) not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                raise
            found = self.find(uri)  # a store without conditional deletes: check, then delete
            if found is None or found.tag != tag:
                return False
            client.delete_object(Bucket=bucket, Key=key)
        return True

    def _put(self, uri: str, body: dict, **condition: str) -> str | None:
        bucket, key = storage.split_s3(uri)
        try:
            put = storage.s3_client().put_object(
                Bucket=bucket, Key=key, Body=json.dumps(body).encode(), **condition, **self.extra
            )
        except storage.s3_client().exceptions.ClientError as err:
            if _lost_race(err):
                return None
            raise
        return put["ETag"]


def _lost_race(err: Exception) -> bool:
    """412 (condition failed), 409 (concurrent conditional write) or 404 (already gone)."""
    return storage.s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                    "404", "412")  # fmt: skip


def _parse(raw: bytes) -> dict:
    try:
        owner = json.loads(raw)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _process_gone(owner: dict) -> bool:
    """True when the owner ran on this host and its process no longer exists."""
    if owner.get("host") != HOST or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe(owner: dict) -> str:
    return (
        f"{owner.get('holder', 'scan ' + str(owner.get('scan_id', '?')))} (pid "
        f"{owner.get('pid', '?')} on {owner.get('host', '?')}) since "
        f"{owner.get('acquired_at', '?')}"
    )


class Locks:
    """Locks of one kind (one TTL and owner record), in a folder or at given URIs."""

    def __init__(
        self, root: str, owner: dict, ttl_s: float, encryption: storage.Encryption
    ) -> None:
        self.root = storage.join(root, "locks")
        self.owner = {**owner, "host": HOST, "pid": os.getpid()}
        self.ttl_s = ttl_s
        self.store = S3Locks(encryption) if storage.is_s3(root) else LocalLocks()

    def acquire(self, key: str, **details: str) -> Lock:
        """Take the lock ``key`` of the lock folder (taking over a stale one) or raise
        ``LockHeld``."""
        return self.acquire_at(storage.join(self.root, f"{key}.lock"), **details)

    def acquire_at(self, uri: str, **details: str) -> Lock:
        """Take the lock object at ``uri`` (taking over a stale one) or raise ``LockHeld``."""
        body = {
            **self.owner,
            **details,
            "token": uuid.uuid4().hex,
            "acquired_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for _ in range(3):  # a lock released between our create and find is retried
            tag = self.store.create(uri, body)
            if tag:
                return Lock(uri, tag, body)
            found = self.store.find(uri)
            if found is None:
                continue
            if found.age_s < self.ttl_s and not _process_gone(found.owner):
                raise LockHeld(f"being audited by {describe(found.owner)}")
            tag = self.store.replace(uri, found.tag, body)
            if tag:
                log.warning("%s: took over a stale lock of %s", uri, describe(found.owner))
                return Lock(uri, tag, body)
        raise LockHeld(f"{uri}: lock contended by other processes; retry later")

    def renew(self, lock: Lock) -> bool:
        """Renew a held lock (its age starts again); False when it was taken over."""
        tag = self.store.renew(lock.uri, lock.tag, lock.body)
        if tag is None:
            return False
        lock.tag = tag
        return True

    def release(self, lock: Lock) -> None:
        if not self.store.delete(lock.uri, lock.tag):
            log.warning("%s: lock was taken over before release (holder stalled past the TTL?)",
                        lock.uri)  # fmt: skip

    @contextlib.contextmanager
    def held(self, lock: Lock) -> Iterator[Lock]:
        """Keep ``lock`` renewed (every quarter TTL) while the block runs, release it after."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / 4):
                try:
                    if not self.renew(lock):
                        log.warning("%s: lock lost to another process", lock.uri)
                        return
                except Exception as err:  # a failed renewal is retried at the next beat
                    log.warning("%s: could not renew the lock (%s)", lock.uri, err)

        thread = threading.Thread(target=beat, name=f"lock-heartbeat {lock.uri}", daemon=True)
        thread.start()
        try:
            yield lock
        finally:
            stop.set()
            thread.join()
            try:
                self.release(lock)
            except Exception as err:  # never hide the block's outcome; the lock goes stale
                log.warning("%s: could not release the lock (%s)", lock.uri, err)
