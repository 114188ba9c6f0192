"""Storage through pyarrow.fs: local atomic writes, S3 against a real S3-compatible server."""

from __future__ import annotations

import time

import pytest

from cogdist.errors import StorageError
from cogdist.storage import open_location, redact
from tests.conftest import S3_SECRET, free_port


def test_local_write_is_atomic_and_leaves_no_temporary(tmp_path):
    out = open_location(str(tmp_path / "out"))
    out.write_bytes("a/b/c.bin", b"x" * 100)
    assert (tmp_path / "out" / "a" / "b" / "c.bin").read_bytes() == b"x" * 100
    out.write_bytes("a/b/c.bin", b"y")  # overwrite
    assert out.read_bytes("a/b/c.bin") == b"y"
    assert [p.name for p in (tmp_path / "out" / "a" / "b").iterdir()] == ["c.bin"]


def test_sweep_removes_what_a_killed_writer_left(tmp_path):
    out = open_location(str(tmp_path))
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / ".part-1.parquet.tmp").write_bytes(b"half")
    (tmp_path / "index" / "part-0.parquet").write_bytes(b"whole")
    assert out.sweep_temporary("index") == 1
    assert [p.name for p in (tmp_path / "index").iterdir()] == ["part-0.parquet"]


def test_file_uri_and_plain_path_are_the_same_place(tmp_path):
    a = open_location(str(tmp_path))
    b = open_location(f"file://{tmp_path}")
    assert a.root == b.root
    a.write_bytes("x.txt", b"1")
    assert b.read_bytes("x.txt") == b"1"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        open_location(str(tmp_path)).read_bytes("nope.bin")


def test_s3_round_trip_with_endpoint_from_environment(s3_bucket):
    out = open_location(f"s3://{s3_bucket}/some/prefix")
    assert out.public_uri == f"s3://{s3_bucket}/some/prefix"
    out.write_bytes("outputs/aa/x.png", b"\x89PNG" + b"0" * 10_000)
    assert out.read_bytes("outputs/aa/x.png")[:4] == b"\x89PNG"
    assert out.exists("outputs/aa/x.png") and not out.exists("outputs/aa/y.png")
    assert [f.base_name for f in out.list_files("outputs/aa")] == ["x.png"]
    assert out.uri_of("outputs/aa/x.png") == f"s3://{s3_bucket}/some/prefix/outputs/aa/x.png"


def test_workers_get_the_endpoint_in_their_uri(s3_server, s3_bucket, monkeypatch):
    out = open_location(f"s3://{s3_bucket}/p")
    assert "endpoint_override=127.0.0.1" in out.worker_uri and "scheme=http" in out.worker_uri
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    elsewhere = open_location(out.worker_uri)
    out.write_bytes("w.bin", b"seen")
    assert elsewhere.read_bytes("w.bin") == b"seen"


def test_credentials_in_the_uri_are_used_but_never_shown(s3_server, s3_bucket):
    uri = f"s3://{s3_server['AWS_ACCESS_KEY_ID']}:{S3_SECRET}@{s3_bucket}/p"
    out = open_location(uri)
    out.write_bytes("k.bin", b"1")
    assert S3_SECRET not in out.public_uri and S3_SECRET not in out.uri_of("k.bin")
    assert S3_SECRET not in redact(uri)
    assert S3_SECRET not in redact(f"s3://{s3_bucket}/p?secret_key={S3_SECRET}")


def test_s3_endpoint_in_the_uri(s3_server, s3_bucket, monkeypatch):
    endpoint = s3_server["AWS_ENDPOINT_URL"].removeprefix("http://")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    out = open_location(f"s3://{s3_bucket}/q?endpoint_override={endpoint}&scheme=http")
    out.write_bytes("a.bin", b"abc")
    assert out.read_bytes("a.bin") == b"abc"
    assert "endpoint_override" not in out.uri_of("a.bin")


def test_unknown_s3_option_is_refused(s3_bucket):
    with pytest.raises(StorageError, match="unknown query option 'colour'"):
        open_location(f"s3://{s3_bucket}/q?colour=red")


def test_an_unreachable_store_is_retried_for_the_timeout_then_named_without_secrets():
    port = free_port()  # nothing listens there
    location = open_location(
        f"s3://key:{S3_SECRET}@bucket/run?endpoint_override=127.0.0.1:{port}&scheme=http", retry_seconds=3
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        location.write_bytes("outputs/a.png", b"x" * 10)
    waited = time.monotonic() - started
    assert 1.5 <= waited <= 30, waited
    message = str(error.value)
    assert "s3://bucket/run/outputs/a.png" in message and "attempt(s)" in message
    assert S3_SECRET not in message
