"""Locks, on a local folder and on S3 (moto on loopback): one holder at a time, a stale or
orphaned lock taken over, a release or renewal that never touches another holder's lock, and
a heartbeat that keeps a long-held lock fresh."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from ezmia.data import storage
from ezmia.data.locks import HOST, LockHeld, Locks
from tests.conftest import dead_pid

NO_SSE = storage.Encryption()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """The folder the locks live under: a local directory or an S3 prefix."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/out"
    return str(tmp_path / "out")


def locks(root: str, name: str, ttl_s: float = 3600, encryption=NO_SSE) -> Locks:
    return Locks(root, {"scan_id": name}, ttl_s=ttl_s, encryption=encryption)


def owner_of(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def test_a_held_lock_refuses_a_second_holder_until_released(root):
    first, second = locks(root, "first"), locks(root, "second")
    held = first.acquire("k")
    with pytest.raises(LockHeld, match=rf"being audited by scan first \(pid {os.getpid()} on "):
        second.acquire("k")
    first.release(held)
    assert not storage.exists(held.uri)
    again = second.acquire("k")
    assert owner_of(again.uri)["scan_id"] == "second"


def test_a_lock_past_its_ttl_is_taken_over_and_the_old_holder_cannot_touch_it(root, caplog):
    stalled = locks(root, "stalled").acquire("k")
    newcomer = locks(root, "newcomer", ttl_s=0)  # every lock it finds is past its TTL
    with caplog.at_level(logging.WARNING, logger="ezmia.data.locks"):
        taken = newcomer.acquire("k")
    assert "took over a stale lock of scan stalled" in caplog.text
    old = locks(root, "stalled")
    assert not old.renew(stalled)  # the stalled holder learns it lost the lock
    old.release(stalled)  # and its release leaves the new holder's lock in place
    assert owner_of(taken.uri)["scan_id"] == "newcomer"
    newcomer.release(taken)
    assert not storage.exists(taken.uri)


def test_a_local_lock_file_older_than_the_ttl_is_stale(tmp_path):
    out = str(tmp_path / "out")
    held = locks(out, "first").acquire("k")
    path = Path(held.uri)
    path.write_text(json.dumps({**owner_of(held.uri), "host": "elsewhere"}))
    with pytest.raises(LockHeld, match="scan first"):
        locks(out, "second", ttl_s=3600).acquire("k")  # an hour-long TTL: still fresh
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    taken = locks(out, "second", ttl_s=3600).acquire("k")  # two hours old: stale
    assert owner_of(taken.uri)["scan_id"] == "second"


def test_a_lock_whose_process_died_on_this_host_is_taken_over_at_once(root):
    orphan = locks(root, "killed").acquire("k")
    dead = {**owner_of(orphan.uri), "pid": dead_pid()}
    storage.write_bytes(orphan.uri, json.dumps(dead).encode())
    taken = locks(root, "next").acquire("k")  # fresh, but its owner is gone
    assert owner_of(taken.uri)["scan_id"] == "next"


def test_a_dead_pid_on_another_host_is_not_judged_from_here(root):
    held = locks(root, "remote").acquire("k")
    elsewhere = {**owner_of(held.uri), "pid": dead_pid(), "host": f"not-{HOST}"}
    storage.write_bytes(held.uri, json.dumps(elsewhere).encode())
    with pytest.raises(LockHeld, match=f"scan remote \\(pid {elsewhere['pid']} on not-"):
        locks(root, "next").acquire("k")


def test_an_unreadable_lock_still_holds_until_it_is_stale(root):
    uri = storage.join(root, "locks", "k.lock")
    storage.write_bytes(uri, b"\x00 not json")
    with pytest.raises(LockHeld, match=r"being audited by scan \? \(pid \? on \?\) since \?"):
        locks(root, "next").acquire("k")
    taken = locks(root, "next", ttl_s=0).acquire("k")
    assert owner_of(taken.uri)["scan_id"] == "next"


def test_a_local_release_puts_back_a_lock_that_is_not_ours(tmp_path):
    out = str(tmp_path / "out")
    mine = locks(out, "mine").acquire("k")
    theirs = {**owner_of(mine.uri), "scan_id": "theirs", "token": "other"}
    Path(mine.uri).write_text(json.dumps(theirs))
    locks(out, "mine").release(mine)
    assert owner_of(mine.uri) == theirs
    assert sorted(p.name for p in Path(mine.uri).parent.iterdir()) == ["k.lock"]  # no debris


def test_a_lock_is_released_when_the_block_raises(root):
    holder = locks(root, "first")
    lock = holder.acquire("k")
    with pytest.raises(RuntimeError, match="boom"), holder.held(lock):
        raise RuntimeError("boom")
    assert not storage.exists(lock.uri)


def test_s3_lock_objects_are_written_with_the_audits_encryption(s3, bucket):
    root = f"s3://{bucket}/out"
    lock = locks(root, "first", encryption=storage.Encryption("AES256")).acquire("k")
    _, key = storage.split_s3(lock.uri)
    assert s3.client().head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_heartbeat_keeps_a_long_held_lock_from_looking_stale(where, tmp_path, request):
    ttl = 0.6 if where == "local" else 2.5  # S3 times lock ages in whole seconds
    root = str(tmp_path)
    if where == "s3":
        root = f"s3://{request.getfixturevalue('bucket')}/out"
    holder = Locks(root, {"holder": "first"}, ttl_s=ttl, encryption=NO_SSE)
    rival = Locks(root, {"holder": "second"}, ttl_s=ttl, encryption=NO_SSE)
    lock = holder.acquire("k")
    with holder.held(lock):
        time.sleep(2.2 * ttl)
        with pytest.raises(LockHeld, match="first"):
            rival.acquire("k")
    assert not storage.exists(lock.uri)
    unrenewed = holder.acquire("k")
    time.sleep(1.4 * ttl)  # past the TTL with nobody renewing: stale
    taken = rival.acquire("k")
    assert taken.body["holder"] == "second"
    assert not holder.renew(unrenewed)
