"""Faults in the middle of a run: the S3 endpoint going away while scores are written, an
unexpected error inside scoring, an S3 error late in the run. None leaves a ``_SUCCESS``;
each ends with a clear error; a rerun after the fault completes.

(Ray faults, a killed actor or a lost worker node, are covered with the Ray job tests.)"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ezmia.cli import main
from ezmia.data import outputs, storage
from tests.conftest import audit_args
from tests.infra import LOCALHOST, free_port

REPO = Path(__file__).resolve().parents[1]


class TcpProxy:
    """A loopback TCP forwarder in front of a server: ``stop()`` cuts every connection and
    refuses new ones (the endpoint is down) while the server keeps its data; ``start()``
    brings the endpoint back on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = (LOCALHOST, target_port)
        self.port = free_port()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> TcpProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((LOCALHOST, self.port))
        server.listen(64)
        server.settimeout(0.1)
        self._stop.clear()
        self._sockets = [server]
        self._thread = threading.Thread(target=self._accept, args=(server,), daemon=True)
        self._thread.start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets = []


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ezmia:")]
    assert len(lines) == 1, err
    return lines[0]


def _dataset(models, path: Path, rows: int, row_group_size: int) -> Path:
    """``rows`` labelled texts of the demo's eval set (repeated under new ids if needed)."""
    table = pq.read_table(models.eval)
    while table.num_rows < rows:
        table = pa.concat_tables([table, table])
    table = table.slice(0, rows)
    table = table.set_column(0, "id", pa.array([f"row-{i}" for i in range(rows)]))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _keys(client, bucket: str, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_s3_going_down_mid_write_fails_cleanly_and_a_rerun_completes(
    models, s3, tmp_path, monkeypatch
):
    """The audit runs in a child process writing to S3 through a proxy; as soon as its first
    scores part lands, the proxy cuts the endpoint off. The child must fail with one clear
    line and leave no ``_SUCCESS``; once the endpoint is back, a rerun completes."""
    bucket = s3.make_bucket("faults-mid-write")
    client = s3.client()
    rows = 48
    data = _dataset(models, tmp_path / "data.parquet", rows, row_group_size=1)  # 1 part per row
    out = f"s3://{bucket}/audit"
    proxy = TcpProxy(s3.port).start()
    env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "EZMIA_S3_MAX_ATTEMPTS": "2"}
    child = subprocess.Popen(
        [sys.executable, "-m", "ezmia", *audit_args(models, out, data=data, max_length=32)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while child.poll() is None and time.monotonic() < deadline:
            if _keys(client, bucket, "audit/scores/"):
                proxy.stop()
                break
            time.sleep(0.02)
        _, err = child.communicate(timeout=300)
    finally:
        proxy.stop()
        if child.poll() is None:
            child.kill()
    assert child.returncode == 2, err
    line = _error_line(err)
    assert line.startswith(f"ezmia: error: {out}/")
    assert "could not connect to the S3 endpoint" in line and "AWS_ENDPOINT_URL" in line
    left = _keys(client, bucket, "audit/")
    assert "audit/_SUCCESS" not in left and "audit/summary.json" not in left
    assert any(key.startswith("audit/scores/") for key in left)  # the fault hit mid-write
    assert len([k for k in left if k.startswith("audit/scores/")]) < rows

    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage.s3_client.cache_clear()
    try:
        assert main(audit_args(models, out, data=data, max_length=32)) == 0
    finally:
        proxy.stop()
        storage.s3_client.cache_clear()
    done = _keys(client, bucket, "audit/")
    assert "audit/_SUCCESS" in done and "audit/summary.json" in done
    scores = pq.read_table(f"{bucket}/audit/scores/", filesystem=s3.filesystem())
    assert scores.num_rows == rows and len(set(scores.column("id").to_pylist())) == rows


def test_an_unexpected_error_inside_scoring_leaves_no_report(models, tmp_path, monkeypatch):
    """A bug while scoring the second fragment (after the first part was written) must not
    leave ``_SUCCESS``, a summary, a report or orphaned score parts."""
    import ezmia.engines.scoring

    data = _dataset(models, tmp_path / "data.parquet", 8, row_group_size=4)
    real = ezmia.engines.scoring.score_sequence
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom: a bug inside scoring")
        return real(*args, **kwargs)

    monkeypatch.setattr(ezmia.engines.scoring, "score_sequence", failing)
    written = []
    real_write = outputs.write_scores

    def recording(out, table, encryption, part=0):
        written.append(real_write(out, table, encryption, part))
        return written[-1]

    monkeypatch.setattr(outputs, "write_scores", recording)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        main(audit_args(models, out, data=data, max_length=32))
    assert len(written) == 1  # the first part had been written
    assert not out.exists()


def test_an_s3_error_late_in_the_run_is_one_line(models, tmp_path, monkeypatch, capsys):
    """A raw botocore error no module mapped (here while rendering the report) still ends
    as one line without a traceback or the request URL, and leaves no report."""
    from botocore.exceptions import EndpointConnectionError

    def fail(*_args, **_kwargs):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k?X-Amz-Signature=abc")

    monkeypatch.setattr("ezmia.report.publish.render_report", fail)
    data = _dataset(models, tmp_path / "data.parquet", 8, row_group_size=8)
    out = tmp_path / "out"
    assert main(audit_args(models, out, data=data, max_length=32)) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("ezmia: error: S3: could not connect to the S3 endpoint")
    assert "X-Amz-Signature" not in line
    assert not out.exists()
