"""Loopback-only test infrastructure: a moto S3 server, a 2-node local Ray cluster, and a
check that nothing we started listens on a non-loopback address.

Plain functions and classes, no pytest fixtures (conftest.py wraps them).

Network rule: everything binds to 127.0.0.1 and talks only to 127.0.0.1. For Ray that takes
more than ``node_ip_address="127.0.0.1"``: without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
Ray resolves "127.0.0.1" to the machine's external IP in places (e.g. the dashboard's job
module calls ``ray.init`` and dials the GCS on the eth0 address, which hangs job submission),
and usage stats would phone home. Importing this module therefore sets ``LOOPBACK_RAY_ENV``
in ``os.environ``; Ray reads the first variable when ``ray`` is first imported, so import this
module (conftest does) before anything imports ``ray``. ``LocalRayCluster.start`` also patches
the already-imported constant, so a late import still works.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
"""The bin directory of the interpreter running the tests (the project venv)."""

LOOPBACK_RAY_ENV: dict[str, str] = {
    # Makes ray._private.services.get_node_ip_address() return 127.0.0.1 instead of the
    # address of the default route. Without it the dashboard's job module connects to the
    # GCS at <eth0-ip>:port and `submit_job` hangs (seen with Ray 2.60).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # No usage-stats reporting to the internet.
    "RAY_USAGE_STATS_ENABLED": "0",
}

os.environ.update(LOOPBACK_RAY_ENV)

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _wait_http(host: str, port: int, timeout: float, path: str = "/") -> None:
    """Wait until ``GET path`` on host:port gets any HTTP response."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError as e:  # refused, reset, timeout
            last = e
            time.sleep(0.1)
        finally:
            conn.close()
    raise TimeoutError(f"http://{host}:{port}{path} did not answer in {timeout}s: {last}")


def _stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL, one process (by its pid) we started."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


# --------------------------------------------------------------------------------------
# S3: moto server
# --------------------------------------------------------------------------------------


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a child process.

    ::

        with MotoServer() as s3:
            s3.make_bucket("ezmia-test")
            subprocess.run(cmd, env={**os.environ, **s3.env})

    ``stop()`` / ``start()`` restart the server on the same port, e.g. to cut S3 off in the
    middle of a write. moto keeps everything in memory, so a restart LOSES ALL BUCKETS AND
    OBJECTS. ``start()`` re-creates (empty) the buckets made through ``make_bucket`` unless
    ``recreate_buckets=False``; objects are gone either way.
    """

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing-secret"  # noqa: S105 - dummy credentials for moto
    REGION = "us-east-1"

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0):
        self.port = port or free_port()
        self.host = LOCALHOST
        self.startup_timeout = startup_timeout
        self.buckets: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="ezmia-moto-"))
        self.log_path = self._log_dir / "moto_server.log"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for boto3, pyarrow's S3FileSystem and Ray Data to use this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_REGION": self.REGION,
            # Never try the instance metadata service (169.254.169.254) for creds/region.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, recreate_buckets: bool = True) -> MotoServer:
        if self.running():
            return self
        exe = VENV_BIN / "moto_server"
        cmd = [str(exe), "-H", self.host, "-p", str(self.port)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: our signals don't reach it
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if recreate_buckets:
            for name in self.buckets:
                self._create_bucket(name)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                _wait_http(self.host, self.port, timeout=0.5, path="/moto-api/")
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"moto_server on {self.endpoint} not ready: {self.log_tail()}"
                    ) from None

    def stop(self) -> None:
        """Stop the server (data is lost). Safe to call twice."""
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None

    def restart(self, recreate_buckets: bool = True) -> MotoServer:
        self.stop()
        return self.start(recreate_buckets=recreate_buckets)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)

    def reset(self) -> None:
        """Drop all state without restarting (moto's /moto-api/reset)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self, **config: Any):
        """A boto3 S3 client for this server (extra kwargs go to botocore Config)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
            config=Config(**{"retries": {"max_attempts": 2, "mode": "standard"}, **config}),
        )

    def filesystem(self):
        """A ``pyarrow.fs.S3FileSystem`` pointed explicitly at this server."""
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.ACCESS_KEY,
            secret_key=self.SECRET_KEY,
            region=self.REGION,
            endpoint_override=f"{self.host}:{self.port}",
            scheme="http",
        )

    def _create_bucket(self, name: str) -> None:
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
            c.create_bucket(Bucket=name)

    def make_bucket(self, name: str) -> str:
        """Create the bucket (idempotent); it is re-created by ``start()`` after a restart."""
        self._create_bucket(name)
        if name not in self.buckets:
            self.buckets.append(name)
        return name

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# Ray: 2-node loopback cluster
# --------------------------------------------------------------------------------------

DEFAULT_JOB_EXCLUDES = [
    ".venv",
    ".git",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    ".cache",
]


FAST_FAILURE_DETECTION: dict[str, int] = {
    # GCS health checks of raylets: a killed worker node is declared dead in ~6 s instead of
    # ~16 s (defaults 3000 / 10000 / 5), which keeps fault tests short. The generous timeout
    # avoids false "node died" on a loaded 2-core machine.
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 5,
}


class LocalRayCluster:
    """A head and one worker node, both on 127.0.0.1, via ``ray.cluster_utils.Cluster``.

    The Ray processes are children of this (test) process. Each cluster gets its own
    ``RAY_TMPDIR`` (so it never touches /tmp/ray or another session's cluster) and free
    ports for GCS, dashboard, dashboard agent and metrics (no fixed 6379/8265/52365).

    ::

        with LocalRayCluster() as rc:
            status, logs = rc.submit(f"{sys.executable} -c 'print(1)'", None, {}, 120)

    ``os.environ`` gets ``LOOPBACK_RAY_ENV``, ``RAY_TMPDIR``, ``RAY_AUTH_MODE=disabled`` and
    the venv bin first on PATH while the cluster runs (restored by ``shutdown``); Ray's
    processes and job drivers inherit them, so a job's bare ``python`` is the venv's.
    """

    def __init__(
        self,
        head_cpus: float = 2,
        worker_cpus: float = 2,
        object_store_mb: int = 200,
        worker_resources: Mapping[str, float] | None = None,
        system_config: Mapping[str, Any] | None = None,
        keep_tmp: bool = False,
    ):
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.worker_resources = dict(worker_resources or {})
        self.system_config = {**FAST_FAILURE_DETECTION, **(system_config or {})}
        self.keep_tmp = keep_tmp or os.environ.get("EZMIA_KEEP_RAY_TMP") == "1"
        self.cluster = None  # ray.cluster_utils.Cluster
        self.worker_node = None  # ray._private.node.Node
        self.dashboard_port: int | None = None
        self.tmp_root: Path | None = None
        self._saved_env: dict[str, str | None] = {}
        self._client = None

    # -- lifecycle ---------------------------------------------------------------------

    def _set_env(self, key: str, value: str) -> None:
        if key not in self._saved_env:
            self._saved_env[key] = os.environ.get(key)
        os.environ[key] = value

    def _restore_env(self) -> None:
        for key, old in self._saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._saved_env.clear()

    def start(self, timeout: float = 120.0) -> LocalRayCluster:
        if self.cluster is not None:
            return self
        # Short path: Unix socket paths under it must stay below 108 bytes.
        self.tmp_root = Path(tempfile.mkdtemp(prefix="ezr-", dir="/tmp"))
        (self.tmp_root / "ray").mkdir()
        for k, v in LOOPBACK_RAY_ENV.items():
            self._set_env(k, v)
        self._set_env("RAY_TMPDIR", str(self.tmp_root))
        # Ray 2.60 enables token auth whenever ~/.ray/auth_token exists; this test cluster is
        # loopback-only and private to the test process, so make it independent of that file.
        self._set_env("RAY_AUTH_MODE", "disabled")
        path = os.environ.get("PATH", "")
        if not path.startswith(str(VENV_BIN) + os.pathsep):
            self._set_env("PATH", f"{VENV_BIN}{os.pathsep}{path}")

        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        # In case `ray` was imported before LOOPBACK_RAY_ENV was set.
        ray_constants.ENABLE_RAY_CLUSTER = False

        self.dashboard_port = free_port()
        try:
            self.cluster = Cluster(
                initialize_head=True,
                connect=False,
                head_node_args={
                    "node_ip_address": LOCALHOST,
                    "num_cpus": self.head_cpus,
                    "object_store_memory": self.object_store_bytes,
                    "include_dashboard": True,
                    "dashboard_host": LOCALHOST,
                    "dashboard_port": self.dashboard_port,
                    "gcs_server_port": free_port(),
                    "dashboard_agent_listen_port": free_port(),
                    "metrics_export_port": free_port(),
                    "_system_config": self.system_config,
                },
            )
            self.add_worker()
            _wait_http(LOCALHOST, self.dashboard_port, timeout, path="/api/version")
        except BaseException:
            self.shutdown()
            raise
        return self

    def add_worker(self):
        """Start a (new) worker node; returns its ``ray._private.node.Node``."""
        assert self.cluster is not None, "cluster not started"
        self.worker_node = self.cluster.add_node(
            node_ip_address=LOCALHOST,
            num_cpus=self.worker_cpus,
            object_store_memory=self.object_store_bytes,
            resources=self.worker_resources or None,
        )
        return self.worker_node

    def remove_worker(self, graceful: bool = False) -> None:
        """Kill the worker node's processes (raylet, agents, workers): a node failure."""
        assert self.cluster is not None and self.worker_node is not None, "no worker node"
        node, self.worker_node = self.worker_node, None
        self.cluster.remove_node(node, allow_graceful=graceful)

    def shutdown(self) -> None:
        """Stop all nodes, restore os.environ, delete the temp dir. Safe to call twice."""
        self._client = None
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            finally:
                self.cluster = None
                self.worker_node = None
        self._restore_env()
        if self.tmp_root is not None and not self.keep_tmp:
            shutil.rmtree(self.tmp_root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- addresses ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """GCS address, "127.0.0.1:PORT" (for ``ray.init(address=...)``)."""
        assert self.cluster is not None, "cluster not started"
        return self.cluster.address

    @property
    def dashboard_url(self) -> str:
        """Job server / dashboard, "http://127.0.0.1:PORT" (RAY_ADDRESS for ``ray job``)."""
        return f"http://{LOCALHOST}:{self.dashboard_port}"

    # -- jobs --------------------------------------------------------------------------

    @property
    def client(self):
        """``ray.job_submission.JobSubmissionClient`` for this cluster."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard_url)
        return self._client

    def submit_job(
        self,
        entrypoint: str,
        working_dir: str | os.PathLike | None = None,
        env_vars: Mapping[str, str] | None = None,
        excludes: Iterable[str] = DEFAULT_JOB_EXCLUDES,
        **kwargs: Any,
    ) -> str:
        """Submit without waiting; returns the submission id.

        The job's PATH starts with the venv's bin dir, so ``python`` in the entrypoint is
        the venv interpreter (``sys.executable`` works too). ``env_vars`` (e.g.
        ``MotoServer.env``) go to the driver and every task/actor of the job.
        """
        env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.update(LOOPBACK_RAY_ENV)
        env.update(env_vars or {})
        runtime_env: dict[str, Any] = {"env_vars": env}
        if working_dir is not None:
            runtime_env["working_dir"] = str(working_dir)
            runtime_env["excludes"] = list(excludes)
        return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, **kwargs)

    def wait_job(self, job_id: str, timeout: float, poll: float = 0.5) -> tuple[str, str]:
        """Wait for a terminal status: ``(status, logs)``.

        On timeout the job is stopped and the status returned is "TIMEOUT".
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.get_job_status(job_id)
            if status.is_terminal():
                return str(status.value), self.client.get_job_logs(job_id)
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    self.client.stop_job(job_id)
                logs = ""
                with contextlib.suppress(Exception):
                    logs = self.client.get_job_logs(job_id)
                return "TIMEOUT", logs
            time.sleep(poll)

    def submit(
        self,
        entrypoint: str,
        working_dir: str | os.PathLike | None = None,
        env_vars: Mapping[str, str] | None = None,
        timeout: float = 300.0,
    ) -> tuple[str, str]:
        """Submit through the job server and wait: ``(status, logs)``.

        status is "SUCCEEDED", "FAILED", "STOPPED", or "TIMEOUT" (job stopped by us).
        """
        job_id = self.submit_job(entrypoint, working_dir, env_vars)
        return self.wait_job(job_id, timeout)


# --------------------------------------------------------------------------------------
# Listener audit
# --------------------------------------------------------------------------------------


def _ss_lines(listening: bool = True) -> list[tuple[str, str, str, str]]:
    """(proto, local, peer, process) per TCP/UDP socket: listening/bound ones, or all."""
    out: list[tuple[str, str, str, str]] = []
    mode = "l" if listening else "a"
    for proto, flags in (("tcp", f"-H{mode}tnp"), ("udp", f"-H{mode}unp")):
        res = subprocess.run(["ss", flags], capture_output=True, text=True, check=True)
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            # State Recv-Q Send-Q Local Peer [Process]
            out.append((proto, parts[3], parts[4], " ".join(parts[5:])))
    return out


def _host_of(local: str) -> str:
    host = local.rsplit(":", 1)[0]
    host = host.strip("[]")
    return host.split("%", 1)[0]  # 127.0.0.53%lo


def is_loopback(local: str) -> bool:
    """Whether an ``ss`` local address ("127.0.0.1:80", "[::ffff:127.0.0.1]:80", "*:80",
    "[::]:80", "0.0.0.0:80") is bound to loopback only."""
    host = _host_of(local)
    if host in ("*", ""):
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def listener_snapshot() -> set[str]:
    """Every current listener, for use as ``listeners_off_loopback(baseline=...)``."""
    return {f"{proto} {local} {process}" for proto, local, _, process in _ss_lines()}


def process_tree(root: int | None = None) -> set[int]:
    """``root`` (default: this process) and all its descendants, from /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces/parens.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    seen, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    return seen


def _pids_of(process: str) -> set[int]:
    """Pids in an ``ss -p`` process column: users:(("raylet",pid=123,fd=30),...)."""
    return {int(m) for m in re.findall(r"pid=(\d+)", process)}


def listeners_off_loopback(
    baseline: Iterable[str] | None = None, pids: Iterable[int] | None = None
) -> list[str]:
    """Listening TCP/UDP sockets bound to anything but 127.0.0.0/8 or ::1.

    ``baseline``: a ``listener_snapshot()`` taken before starting anything; those entries
    are ignored (the sandbox has its own, e.g. 0.0.0.0:2024). ``pids``: if given, only
    sockets owned by these processes count (use ``process_tree()`` to ignore processes of
    other sessions on the same machine). Returns lines "proto local-address process".
    """
    base = set(baseline or ())
    wanted = set(pids) if pids is not None else None
    bad = []
    for proto, local, _, process in _ss_lines():
        line = f"{proto} {local} {process}"
        if line in base or is_loopback(local):
            continue
        if wanted is not None and not (_pids_of(process) & wanted):
            continue
        bad.append(line)
    return bad


def sockets_off_loopback(pids: Iterable[int]) -> list[str]:
    """All TCP/UDP sockets (any state) of ``pids`` whose local or peer address is not
    loopback: catches outgoing connections too, at the moment of the call."""
    wanted = set(pids)
    bad = []
    for proto, local, peer, process in _ss_lines(listening=False):
        if not (_pids_of(process) & wanted):
            continue
        peer_ok = peer.endswith(":*") or is_loopback(peer)
        if not (is_loopback(local) and peer_ok):
            bad.append(f"{proto} {local} -> {peer} {process}")
    return bad
