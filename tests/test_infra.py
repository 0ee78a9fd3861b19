"""The loopback check that tests/engines/test_ray_job.py applies to ezmia's Ray jobs can fail: it
tells loopback addresses from every other kind ``ss`` prints. (What the harness itself
starts, moto and the local Ray cluster, is exercised by every S3 and Ray test of ezmia.)"""

from __future__ import annotations

from tests.infra import is_loopback


def test_only_loopback_addresses_count_as_loopback():
    assert is_loopback("127.0.0.1:80")
    assert is_loopback("127.0.0.53%lo:53")
    assert is_loopback("[::1]:80")
    assert is_loopback("[::ffff:127.0.0.1]:80")
    assert not is_loopback("0.0.0.0:80")
    assert not is_loopback("*:80")
    assert not is_loopback("[::]:80")
    assert not is_loopback("192.0.2.2:80")
    assert not is_loopback("[::ffff:192.0.2.2]:80")
