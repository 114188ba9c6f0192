"""Credentials never appear in output, logs, errors, the index, failures/ or the job record.

tests/test_engine.py checks the records of an in-process run. These run the CLI as a user would,
with a secret of their own in the URIs (percent-encoded, as a '/' or '+' in it must be), and search
everything a user or a reader of OUT could see: stdout and stderr of `render` and `status`, every
object under OUT (Parquet decoded as well as raw), and every file of the run's Ray session (worker
logs included).
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cogdist.errors import StorageError
from cogdist.storage import open_location, read_uri, redact
from tests.conftest import S3_SECRET, cli, free_port, write_manifest

KEY = "AKIACOGDISTTEST"
SECRET = f"sec+ret/{uuid.uuid4().hex}"  # AWS secrets hold '/' and '+'
SPELLINGS = (SECRET, quote(SECRET, safe=""), SECRET.split("/")[1], S3_SECRET)
"""The secret, as it appears in a URI, its unguessable half, and the environment's secret."""


def with_secret(bucket: str, path: str) -> str:
    return f"s3://{KEY}:{quote(SECRET, safe='')}@{bucket}/{path}"


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s for s in SPELLINGS if s.encode() in data]


def assert_clean(where: str, text: str | bytes) -> None:
    found = leaks(text)
    assert not found, f"{where} shows a secret ({found})"


def assert_clean_run(result, what: str) -> None:
    assert_clean(f"{what} stdout", result.stdout)
    assert_clean(f"{what} stderr", result.stderr)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def ray_tmpdir():
    """A Ray temp folder of the test's own (short: Ray's socket paths must fit 107 bytes), so that
    the session logs searched are this run's."""
    folder = tempfile.mkdtemp(prefix="cgr", dir="/tmp")
    yield Path(folder)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def test_a_cli_run_with_credentials_in_its_uris_shows_them_nowhere(
    tmp_path, s3_server, s3_bucket, ray_tmpdir
):
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key="inputs/in.png", Body=png(0))
    rows = [
        {"id": "plain", "prompt": "a red fox"},
        {"id": "edit", "prompt": "make it blue", "image": f"s3://{s3_bucket}/inputs/in.png"},
        {"id": "missing", "prompt": "no input", "image": f"s3://{s3_bucket}/inputs/missing.png"},
    ]
    local = write_manifest(tmp_path / "m.parquet", rows)
    s3.put_object(Bucket=s3_bucket, Key="manifest/m.parquet", Body=local.read_bytes())
    manifest, out = with_secret(s3_bucket, "manifest/m.parquet"), with_secret(s3_bucket, "run")

    render = cli(
        *("render", manifest, "--model", "tiny-glm-image", "--out", out),
        *("--steps", "2", "--max-retries", "0", "--replicas", "1"),
        env={"RAY_TMPDIR": str(ray_tmpdir)},
        own_ray=True,  # the logs of its Ray session, under RAY_TMPDIR, are searched below
    )
    assert render.returncode == 1, render.stderr  # the row whose input is missing failed
    assert f"s3://{s3_bucket}/run" in render.stdout and "missing.png" in render.stderr
    assert_clean_run(render, "render")
    for args in (("status", out, "--manifest", manifest), ("status", out, "--json")):
        status = cli(*args)
        assert status.returncode == 0 and "missing.png" in status.stdout, status.stderr
        assert_clean_run(status, " ".join(args[:1] + args[2:]))

    seen = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="run/"):
        for entry in page.get("Contents", []):
            name = entry["Key"]
            data = s3.get_object(Bucket=s3_bucket, Key=name)["Body"].read()
            assert_clean(name, data)
            if name.endswith(".parquet"):  # compressed pages: search the values too
                assert_clean(name, str(pq.read_table(io.BytesIO(data)).to_pylist()))
            seen.add(name.split("/")[1])
    assert {"index", "failures", "_cogdist", "outputs"} <= seen, seen

    sessions = list(ray_tmpdir.glob("ray/session_2*"))  # RAY_TMPDIR/ray/session_<date>
    assert sessions, f"no Ray session under {ray_tmpdir}"
    searched = 0
    for path in ray_tmpdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert_clean(f"Ray session file {path}", path.read_bytes())
            searched += 1
    assert searched and any(ray_tmpdir.rglob("worker-*.err")), "no worker logs were searched"


def test_an_unreachable_store_is_reported_without_the_credentials(tmp_path, s3_server, ray_tmpdir):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x"}])
    run = cli(
        *("render", str(manifest), "--model", "tiny-cogview4", "--out", with_secret("bucket", "run")),
        *("--storage-timeout", "2"),
        env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "RAY_TMPDIR": str(ray_tmpdir)},
        timeout=120,
    )
    assert run.returncode != 0
    assert_clean_run(run, "render to an unreachable store")


def test_an_input_uri_with_credentials_is_refused_without_showing_them(tmp_path, s3_server):
    rows = [{"id": "a", "prompt": "x", "image": with_secret("bucket", "in.png")}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    refused = cli("validate", str(manifest), "--model", "tiny-glm-image")
    assert refused.returncode == 2 and "image" in refused.stderr, refused.stderr
    assert_clean_run(refused, "validate")


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://{KEY}:{quote(SECRET, safe='')}@/no-bucket",
        f"s3://{KEY}:{quote(SECRET, safe='')}@bucket/run?colour=red",
        f"gs://{KEY}:{quote(SECRET, safe='')}@bucket/run",
        f"nosuchscheme://{KEY}:{quote(SECRET, safe='')}@host/run",
        f"s3://{KEY}:{quote(SECRET, safe='')}@bucket/in.png?endpoint_override=127.0.0.1:{free_port()}&scheme=http",
    ],
    ids=["no bucket", "unknown option", "gs user info", "unknown scheme", "unreachable endpoint"],
)
def test_storage_errors_do_not_quote_credentials(uri):
    with pytest.raises(StorageError) as raised:
        read_uri(uri, 0.5)
    assert_clean("the StorageError", str(raised.value))
    cause = raised.value.__cause__
    assert cause is None or not leaks(str(cause)), "the chained exception shows the secret"
    assert_clean("redact()", redact(uri))


def test_a_secret_with_an_unescaped_slash_does_not_become_the_public_uri():
    """An AWS secret often holds '/': left unescaped it ends the URI's host early, and the rest of
    the secret reads as the path; OUT's public form (the index's `uri`, every message) must not
    show it."""
    uri = f"s3://{KEY}:{SECRET}@bucket/run"
    try:
        location = open_location(uri)
    except StorageError as e:
        assert_clean("the StorageError", str(e))
    else:
        assert_clean("public_uri", location.public_uri)
    assert_clean("redact()", redact(uri))


def test_the_search_finds_what_it_looks_for():
    """The searches above would pass vacuously if they could not see the secret in a URI."""
    assert leaks(with_secret("bucket", "run")) and leaks(f"s3://{KEY}:{SECRET}@bucket/run")
    assert SECRET not in os.environ.values()  # the secret reaches the runs only through URIs
