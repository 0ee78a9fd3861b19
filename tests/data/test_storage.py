"""``ezmia.data.storage`` on its own: paths and URIs, listing, reading, writing (server-side
encryption included) and deleting on a local folder and on S3 (moto on loopback), S3 retries
that follow the AWS configuration chain, and S3 failures told in one line without secrets.

Retries are counted on real failing calls: a small HTTP endpoint on loopback answers every
request with an S3 error and counts the requests, or the client's own ``before-send`` event
counts the tries against a closed port."""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ezmia.data import storage
from ezmia.errors import EzmiaError, InputError, OutputError
from tests.infra import LOCALHOST, MotoServer, free_port

KMS_KEY = "arn:aws:kms:us-east-1:111122223333:key/ezmia-storage-test"
SECRET = "EzmiaStorageSecret/0a1b2c3d+XyZ"  # noqa: S105 - a dummy, looked for in messages
CHAIN_VARIABLES = ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                   "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "EZMIA_S3_MAX_ATTEMPTS",
                   "EZMIA_S3_CONNECT_TIMEOUT", "EZMIA_S3_READ_TIMEOUT")  # fmt: skip


@pytest.fixture
def bucket(s3) -> str:
    """A bucket of this test's own (the conftest one is named after the test, cut short)."""
    return s3.make_bucket(f"st-{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A folder to work in: a local directory or an S3 prefix."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/work"
    return str(tmp_path / "work")


@contextlib.contextmanager
def fresh_client() -> Iterator[None]:
    """A new ``storage.s3_client()`` for the block, built from the environment of the moment."""
    storage.s3_client.cache_clear()
    try:
        yield
    finally:
        storage.s3_client.cache_clear()


def put(s3, bucket: str, *keys: str) -> None:
    client = s3.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())


def head(s3, uri: str) -> dict:
    bucket, key = storage.split_s3(uri)
    return s3.client().head_object(Bucket=bucket, Key=key)


def sent_headers(event: str) -> list[dict[str, str]]:
    """Collects the HTTP headers of every request ``storage.s3_client()`` sends for
    ``event`` (e.g. ``before-send.s3.PutObject``)."""
    sent: list[dict[str, str]] = []

    def record(request, **_):
        sent.append({k.lower(): str(v) for k, v in request.headers.items()})

    storage.s3_client().meta.events.register(event, record)
    return sent


# --------------------------------------------------------------------------------------
# A failing S3 endpoint that counts the requests it gets
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        server: FailingEndpoint = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        server.requests.append(f"{self.command} {self.path}")
        if server.release.wait(server.delay_s):
            return  # the test is over
        status, code = server.answer
        body = b"late" if status == 200 else f"<Error><Code>{code}</Code></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


class FailingEndpoint(ThreadingHTTPServer):
    """An HTTP server on loopback that answers every request with ``answer`` (status, S3
    error code), after ``delay_s``, and keeps a list of the requests it got."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((LOCALHOST, 0), _Handler)
        self.requests: list[str] = []
        self.answer: tuple[int, str] = (503, "SlowDown")
        self.delay_s = 0.0
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.server_port}"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (read timeout) is expected here

    def tries(self, answer: tuple[int, str] = (503, "SlowDown")) -> int:
        """How many requests one ``storage.read_bytes`` (a fresh client, from the
        environment of the moment) sends before it gives up, every one answered ``answer``."""
        self.answer = answer
        self.requests.clear()
        with fresh_client(), pytest.raises(InputError, match="cannot read"):
            storage.read_bytes("s3://some-bucket/some/key")
        return len(self.requests)


@pytest.fixture
def failing(monkeypatch, tmp_path) -> Iterator[FailingEndpoint]:
    """A ``FailingEndpoint`` as ``AWS_ENDPOINT_URL``, with dummy credentials, an empty AWS
    config file and none of the retry settings (each test adds its own)."""
    server = FailingEndpoint()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for variable in CHAIN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    try:
        with fresh_client():
            yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def use_aws_config(monkeypatch, tmp_path: Path, text: str) -> None:
    """An AWS config file (profiles) holding ``text``, as ``AWS_CONFIG_FILE``."""
    config = tmp_path / "aws-profiles"
    config.write_text(text)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))


def retry_mode_in_effect(endpoint: FailingEndpoint) -> str:
    """``legacy`` or ``standard``, told apart by what each retries with 2 attempts: legacy
    retries HTTP 509 but not a 400 ``PriorRequestNotComplete``; standard the other way."""
    tries = (
        endpoint.tries((509, "BandwidthLimit")),
        endpoint.tries((400, "PriorRequestNotComplete")),
    )
    return {(2, 1): "legacy", (1, 2): "standard"}.get(tries, f"unknown {tries}")


# --------------------------------------------------------------------------------------
# Retries follow the AWS configuration chain; EZMIA_S3_MAX_ATTEMPTS wins
# --------------------------------------------------------------------------------------


def test_with_no_retry_setting_a_failing_call_is_tried_three_times(failing):
    assert failing.tries() == 3


def test_aws_max_attempts_from_the_environment_sets_the_number_of_tries(failing, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert failing.tries() == 2
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert failing.tries() == 1


def test_a_profiles_max_attempts_sets_the_number_of_tries(failing, monkeypatch, tmp_path):
    profiles = "[default]\nmax_attempts = 1\n\n[profile auditor]\nmax_attempts = 2\n"
    use_aws_config(monkeypatch, tmp_path, profiles)
    assert failing.tries() == 1
    monkeypatch.setenv("AWS_PROFILE", "auditor")
    assert failing.tries() == 2


def test_ezmia_s3_max_attempts_wins_over_the_aws_chain(failing, monkeypatch, tmp_path):
    use_aws_config(monkeypatch, tmp_path, "[default]\nmax_attempts = 4\n")
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    assert failing.tries() == 1  # over the profile
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "2")
    assert failing.tries() == 2  # over the environment


def test_without_aws_retry_mode_retries_follow_the_standard_mode(failing, monkeypatch):
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "2")
    assert retry_mode_in_effect(failing) == "standard"


def test_aws_retry_mode_from_the_environment_is_honoured(failing, monkeypatch):
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    assert retry_mode_in_effect(failing) == "legacy"


def test_a_profiles_retry_mode_and_max_attempts_are_both_honoured(failing, monkeypatch, tmp_path):
    use_aws_config(monkeypatch, tmp_path, "[default]\nretry_mode = legacy\nmax_attempts = 2\n")
    assert retry_mode_in_effect(failing) == "legacy"


def test_an_unreachable_endpoint_is_tried_as_often_as_configured(failing, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{LOCALHOST}:{free_port()}")  # closed
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with fresh_client():
        tries = sent_headers("before-send.s3.GetObject")
        with pytest.raises(InputError, match="could not connect"):
            storage.read_bytes("s3://some-bucket/some/key")
    assert len(tries) == 2


def test_ezmia_s3_read_timeout_gives_up_on_an_endpoint_that_answers_too_late(failing, monkeypatch):
    failing.answer = (200, "")
    failing.delay_s = 3.0  # then a 200 "late": a client that waited would read it
    monkeypatch.setenv("EZMIA_S3_READ_TIMEOUT", "0.2")
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    with fresh_client(), pytest.raises(InputError, match="could not connect to the S3 endpoint"):
        storage.read_bytes("s3://some-bucket/some/key")
    assert len(failing.requests) == 1


def pyarrow_tries(endpoint: FailingEndpoint) -> int:
    """How many requests opening a Parquet object through ``storage.arrow_filesystem`` (a
    fresh client, from the environment of the moment) sends before it gives up."""
    endpoint.requests.clear()
    with fresh_client(), pytest.raises(OSError, match="503"):
        filesystem, path = storage.arrow_filesystem("s3://some-bucket/data/part-0.parquet")
        filesystem.open_input_file(path)
    return len(endpoint.requests)


def test_pyarrow_reads_are_tried_as_often_as_boto3s_calls(failing, monkeypatch):
    assert pyarrow_tries(failing) == 3
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert pyarrow_tries(failing) == 2
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    assert pyarrow_tries(failing) == 1


def test_pyarrow_reads_give_up_after_ezmias_read_timeout(failing, monkeypatch):
    failing.answer = (200, "")
    failing.delay_s = 3.0
    monkeypatch.setenv("EZMIA_S3_READ_TIMEOUT", "0.2")
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    with fresh_client(), pytest.raises(OSError, match="[Tt]imeout|NETWORK_CONNECTION"):
        filesystem, path = storage.arrow_filesystem("s3://some-bucket/data/part-0.parquet")
        filesystem.open_input_file(path)
    assert len(failing.requests) == 1


# --------------------------------------------------------------------------------------
# Server-side encryption
# --------------------------------------------------------------------------------------


def test_write_bytes_with_aes256_stores_an_sse_s3_object(s3, bucket):
    uri = f"s3://{bucket}/out/a.json"
    storage.write_bytes(uri, b"{}", storage.Encryption("AES256"))
    stored = head(s3, uri)
    assert stored["ServerSideEncryption"] == "AES256"
    assert "SSEKMSKeyId" not in stored


def test_write_bytes_with_aws_kms_and_a_key_stores_an_sse_kms_object_under_that_key(s3, bucket):
    uri = f"s3://{bucket}/out/a.json"
    storage.write_bytes(uri, b"{}", storage.Encryption("aws:kms", KMS_KEY))
    stored = head(s3, uri)
    assert (stored["ServerSideEncryption"], stored["SSEKMSKeyId"]) == ("aws:kms", KMS_KEY)


def test_write_parquet_writes_one_encrypted_object_that_reads_back_as_the_table(s3, bucket):
    table = pa.table({"id": ["a", "b"], "score": [0.25, -1.5]})
    uri = f"s3://{bucket}/out/scores.parquet"
    storage.write_parquet(uri, table, storage.Encryption("aws:kms", KMS_KEY))
    stored = head(s3, uri)
    assert (stored["ServerSideEncryption"], stored["SSEKMSKeyId"]) == ("aws:kms", KMS_KEY)
    assert pq.read_table(io.BytesIO(storage.read_bytes(uri))).equals(table)
    storage.write_parquet(f"s3://{bucket}/out/aes.parquet", table, storage.Encryption("AES256"))
    assert head(s3, f"s3://{bucket}/out/aes.parquet")["ServerSideEncryption"] == "AES256"


@pytest.mark.parametrize("encryption", [None, storage.Encryption()], ids=["none", "empty"])
def test_without_encryption_no_sse_header_is_sent(s3, bucket, encryption):
    uri = f"s3://{bucket}/out/plain.parquet"
    with fresh_client():
        sent = sent_headers("before-send.s3.PutObject")
        storage.write_parquet(uri, pa.table({"x": [1]}), encryption)
        storage.write_bytes(f"{uri}.sse", b"", storage.Encryption("AES256"))  # the control
    plain, control = sent
    assert "x-amz-server-side-encryption" in control
    assert not [h for h in plain if h.startswith("x-amz-server-side-encryption")], plain
    assert "ServerSideEncryption" not in head(s3, uri)


# --------------------------------------------------------------------------------------
# Paths and URIs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("s3://b/k", True), ("s3://b", True), ("/data/s3/x", False), ("s3/x", False),
     ("data.parquet", False), ("http://b/k", False)],
)  # fmt: skip
def test_is_s3_tells_s3_uris_from_local_paths(uri, expected):
    assert storage.is_s3(uri) is expected


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("s3://b/out/a.parquet", ("b", "out/a.parquet")), ("s3://b/out/", ("b", "out/")),
     ("s3://b", ("b", "")), ("s3://b/", ("b", ""))],
)  # fmt: skip
def test_split_s3_gives_the_bucket_and_the_key(uri, expected):
    assert storage.split_s3(uri) == expected


@pytest.mark.parametrize("uri", ["s3://", "s3:///key"])
def test_split_s3_refuses_a_uri_without_a_bucket(uri):
    with pytest.raises(InputError, match=rf"^{uri}: not a valid s3:// URI"):
        storage.split_s3(uri)


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [("s3://b/out", ("scores", "part-0.parquet"), "s3://b/out/scores/part-0.parquet"),
     ("s3://b/out/", ("/scores/", "a"), "s3://b/out/scores/a"),
     ("s3://b", ("k",), "s3://b/k"), ("s3://b/", ("k",), "s3://b/k"),
     ("s3://b/out", (), "s3://b/out"),
     ("/data/out", ("scores", "a"), "/data/out/scores/a"), ("out", ("a",), "out/a"),
     ("/data/out/", ("a",), "/data/out/a")],
)  # fmt: skip
def test_join_appends_parts_with_single_slashes(base, parts, expected):
    assert storage.join(base, *parts) == expected


def test_arrow_filesystem_gives_a_filesystem_and_path_that_read_the_file(root, monkeypatch):
    if not storage.is_s3(root):
        monkeypatch.chdir(Path(root).parent)
        root = Path(root).name  # a relative path comes back absolute
    uri = storage.join(root, "t.parquet")
    storage.write_parquet(uri, pa.table({"x": [1, 2]}))
    fs, path = storage.arrow_filesystem(uri)
    if storage.is_s3(uri):
        assert isinstance(fs, pafs.S3FileSystem) and path == uri.removeprefix("s3://")
    else:
        assert isinstance(fs, pafs.LocalFileSystem) and path == str(Path(uri).resolve())
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2]


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["out", "out/"])
def test_an_s3_prefix_lists_its_folder_and_not_siblings_sharing_its_name(s3, bucket, prefix):
    put(s3, bucket, "out/b", "out/a", "out/sub/c", "out2/x", "outfile", "other/out/y")
    assert storage.list_files(f"s3://{bucket}/{prefix}") == [
        f"s3://{bucket}/out/a",
        f"s3://{bucket}/out/b",
        f"s3://{bucket}/out/sub/c",
    ]


def test_an_s3_uri_of_one_object_lists_just_that_object(s3, bucket):
    put(s3, bucket, "out/a", "out/ab", "out/a.bak")
    assert storage.list_files(f"s3://{bucket}/out/a") == [f"s3://{bucket}/out/a"]


@pytest.mark.parametrize("uri", ["s3://{b}", "s3://{b}/"])
def test_a_bucket_only_uri_lists_every_object(s3, bucket, uri):
    put(s3, bucket, "z", "a/b", "out2/x")
    expected = [f"s3://{bucket}/a/b", f"s3://{bucket}/out2/x", f"s3://{bucket}/z"]
    assert storage.list_files(uri.format(b=bucket)) == expected


def test_an_empty_bucket_or_missing_prefix_lists_nothing(s3, bucket):
    assert storage.list_files(f"s3://{bucket}") == []
    put(s3, bucket, "out/a")
    assert storage.list_files(f"s3://{bucket}/missing") == []
    assert storage.list_files(f"s3://{bucket}/missing/") == []
    assert storage.list_files(f"s3://{bucket}/ou") == []  # a name prefix is not a folder


def test_an_s3_listing_goes_through_every_page(s3, bucket):
    keys = [f"many/{i}" for i in range(5)]
    put(s3, bucket, *keys)
    with fresh_client():
        client = storage.s3_client()
        # moto pages like S3 but at 1000 keys; ask it for pages of 2 instead.
        client.meta.events.register(
            "before-parameter-build.s3.ListObjectsV2",
            lambda params, **_: params.update(MaxKeys=2),
        )
        pages = sent_headers("before-send.s3.ListObjectsV2")
        assert storage.list_files(f"s3://{bucket}/many") == [f"s3://{bucket}/{k}" for k in keys]
    assert len(pages) == 3


def test_a_local_folder_lists_every_file_under_it_sorted(tmp_path):
    out = tmp_path / "out"
    for name in ("b", "a", "sub/deeper/c", ".hidden"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    (out / "empty").mkdir()
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "x").write_text("sibling")
    expected = [str(out / n) for n in (".hidden", "a", "b", "sub/deeper/c")]
    assert storage.list_files(str(out)) == expected


def test_a_local_file_lists_itself_and_a_missing_path_nothing(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x")
    assert storage.list_files(str(tmp_path / "a.parquet")) == [str(tmp_path / "a.parquet")]
    assert storage.list_files(str(tmp_path / "missing")) == []


# --------------------------------------------------------------------------------------
# exists, read_bytes, write_bytes, delete
# --------------------------------------------------------------------------------------


def test_exists_is_true_for_a_written_file_or_object_only(root):
    uri = storage.join(root, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"{}")
    assert storage.exists(uri)
    assert not storage.exists(storage.join(root, "a", "c.json"))


def test_read_bytes_gives_back_what_was_written(root):
    uri = storage.join(root, "blob.bin")
    data = bytes(range(256)) * 3
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"


def test_read_bytes_of_a_missing_file_or_object_raises_file_not_found(root):
    uri = storage.join(root, "missing.json")
    with pytest.raises(FileNotFoundError) as raised:
        storage.read_bytes(uri)
    assert uri in str(raised.value)


def test_delete_removes_a_file_or_object_and_is_silent_when_it_is_missing(root):
    uri = storage.join(root, "a.json")
    storage.delete(uri)  # nothing there yet
    storage.write_bytes(uri, b"{}")
    storage.write_bytes(storage.join(root, "b.json"), b"{}")
    storage.delete(uri)
    assert not storage.exists(uri)
    assert storage.list_files(root) == [storage.join(root, "b.json")]
    storage.delete(uri)  # gone already


def test_a_local_write_creates_folders_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out" / "scores" / "part-0.parquet"
    storage.write_bytes(str(target), b"data")
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-0.parquet"]


def test_a_local_write_replaces_the_file_by_a_rename_not_in_place(tmp_path):
    target = tmp_path / "summary.json"
    storage.write_bytes(str(target), b"old")
    before = target.stat().st_ino
    with target.open("rb") as reader:  # a reader of the old file keeps the old bytes
        storage.write_bytes(str(target), b"new")
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != before
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_local_write_under_a_file_fails_with_one_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    uri = str(tmp_path / "file" / "a.json")
    with pytest.raises(OutputError, match=rf"^{uri}: cannot write \(.+\)$"):
        storage.write_bytes(uri, b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_failed_local_write_leaves_no_temp_file(tmp_path):
    (tmp_path / "a.json").mkdir()  # the rename onto it fails
    with pytest.raises(OutputError, match="cannot write"):
        storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# --------------------------------------------------------------------------------------
# S3 failures in one line
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_with_auth(s3) -> Iterator[MotoServer]:
    """A second moto server that checks credentials (none are known to it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        server = MotoServer().start()
    try:
        yield server
    finally:
        server.close()


def one_line_failure(call, uri: str, action: str, error=InputError) -> str:
    with pytest.raises(error) as raised:
        call(uri)
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"{uri}: cannot {action}: "), line
    assert SECRET not in line and "pa55word" not in line and "operator" not in line, line
    return line


def test_wrong_credentials_are_one_line_naming_the_uri_and_the_fix(moto_with_auth, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_with_auth.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEZMIASTORAGE0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = "s3://audits/out/summary.json"
    with fresh_client():
        lines = [
            one_line_failure(storage.read_bytes, uri, "read"),
            one_line_failure(storage.exists, uri, "check whether it exists"),
            one_line_failure(storage.list_files, uri, "list"),
            one_line_failure(lambda u: storage.write_bytes(u, b""), uri, "write", OutputError),
        ]
    for line in lines:
        assert "access denied" in line and storage.CREDENTIALS_HINT in line, line
        assert "AKIAEZMIASTORAGE0001" not in line


def test_a_pyarrow_access_denied_is_described_like_boto3s(moto_with_auth, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_with_auth.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = "s3://audits/data/a.parquet"

    def read(uri: str) -> None:
        with storage.s3_errors(uri, "read"):
            fs, path = storage.arrow_filesystem(uri)
            fs.open_input_stream(path).read()

    with fresh_client():
        line = one_line_failure(read, uri, "read")
    assert "access denied" in line and storage.CREDENTIALS_HINT in line, line


def test_a_missing_bucket_is_one_line_naming_the_uri(s3):
    uri = "s3://ezmia-no-such-bucket/out/summary.json"
    for call, action in ((storage.read_bytes, "read"), (storage.list_files, "list")):
        line = one_line_failure(call, uri, action)
        assert line.endswith(": the bucket does not exist (check the bucket name, and the "
                             "endpoint and region)"), line  # fmt: skip


def test_an_unreachable_endpoint_is_one_line_without_the_urls_user_info(s3, monkeypatch):
    port = free_port()  # closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://operator:pa55word@{LOCALHOST}:{port}")
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    uri = "s3://audits/out/summary.json"
    with fresh_client():
        for call, action in (
            (storage.read_bytes, "read"),
            (storage.exists, "check whether it exists"),
        ):
            line = one_line_failure(call, uri, action)
            assert line.endswith(
                f"could not connect to the S3 endpoint http://{LOCALHOST}:{port}: "
                "check AWS_ENDPOINT_URL and the network"
            ), line


def test_an_unreachable_s3_only_endpoint_names_aws_endpoint_url_s3(s3, monkeypatch):
    port = free_port()  # closed
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{LOCALHOST}:{port}")
    monkeypatch.setenv("EZMIA_S3_MAX_ATTEMPTS", "1")
    with fresh_client():
        line = one_line_failure(storage.read_bytes, "s3://audits/a.json", "read")
    assert line.endswith(
        f"the S3 endpoint http://{LOCALHOST}:{port}: check AWS_ENDPOINT_URL_S3 and the network"
    ), line


def test_an_unexpected_s3_error_is_one_line_with_urls_and_their_secrets_left_out(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{LOCALHOST}:{free_port()}/?token={SECRET}")
    uri = "s3://audits/out/summary.json"
    with fresh_client():
        line = one_line_failure(storage.read_bytes, uri, "read")
    assert line.startswith(f"{uri}: cannot read: S3 error EndpointResolutionError: "), line
    assert "<url>" in line and "http" not in line.removeprefix(uri), line


def test_a_multi_line_s3_error_is_cut_to_its_first_line(s3):
    uri = "s3://Not_A_Valid_Bucket!/k"  # botocore's ParamValidationError spans lines
    line = one_line_failure(storage.read_bytes, uri, "read")
    assert (
        line == f"{uri}: cannot read: S3 error ParamValidationError: Parameter validation failed:"
    )


def test_s3_errors_leaves_other_errors_as_they_are():
    with pytest.raises(ValueError, match="^not s3$"), storage.s3_errors("s3://b/k", "read"):
        raise ValueError("not s3")
    with pytest.raises(OSError, match="^disk full$"), storage.s3_errors("s3://b/k", "read"):
        raise OSError("disk full")
    original = InputError("s3://b/k: already explained")
    with pytest.raises(EzmiaError) as raised, storage.s3_errors("s3://b/k", "read"):
        raise original
    assert raised.value is original
    for err in (ValueError("x"), OSError("x"), FileNotFoundError("x")):
        assert storage.describe_s3_error(err) is None
