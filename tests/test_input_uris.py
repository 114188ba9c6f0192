"""A manifest names its inputs but cannot say how to reach them: workers read `image` and `video`
with the job's own credentials, so a URI that picks an endpoint, credentials or storage options
(or a scheme cogdist does not read) is refused per row and column, its secrets masked."""

from __future__ import annotations

import os

import pytest

from cogdist.errors import ManifestError
from cogdist.manifest import ManifestSource, validate_manifest
from cogdist.manifest.rows import RowDefaults, work_items
from cogdist.models.registry import resolve_model
from tests.conftest import write_manifest

SECRET = "wJalrXUtnFEMI-do-not-print"

# refused URI -> fragments of the message (after "row 1, id 'x', column '<column>'")
REFUSED = {
    "s3://bucket/cat.png?endpoint_override=evil.example.com": [
        "= 's3://bucket/cat.png?endpoint_override=***'",
        "carries query options",
    ],
    "s3://bucket/cat.png?scheme=http": ["carries query options"],
    "s3://bucket/cat.png?role_arn=arn:aws:iam::123456789012:role/other": ["carries query options"],
    "s3://bucket/cat.png?region=eu-west-1": ["carries query options"],
    f"s3://bucket/cat.png?access_key=AKIA&secret_key={SECRET}": ["carries query options"],
    "s3://bucket/cat.png?": ["carries query options"],
    "s3a://bucket/cat.png?endpoint_override=evil.example.com": ["carries query options"],
    "gs://bucket/cat.png?endpoint_override=evil.example.com": ["carries query options"],
    "gs://bucket/cat.png?scheme=http&anonymous=true": ["carries query options"],
    f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/cat.png": [
        "= 's3://***@bucket/cat.png'",
        "carries credentials (user:password@)",
    ],
    f"s3://:{SECRET}@bucket/cat.png": ["carries credentials"],
    f"gs://user:{SECRET}@bucket/cat.png": ["carries credentials"],
    f"S3://user:{SECRET}@bucket/cat.png?endpoint_override=evil": ["carries credentials"],
    "http://evil.example.com/cat.png": ["'http' is not a scheme cogdist reads inputs from", "s3://"],
    "https://evil.example.com/cat.png": ["'https' is not a scheme"],
    "hdfs://namenode:8020/cat.png": ["'hdfs' is not a scheme"],
    "ftp://host/cat.png": ["'ftp' is not a scheme"],
    f"{SECRET}:x@s3://bucket/cat.png": ["= '***'", "what precedes '://' is no scheme"],
    "s3://evil.example.com:9000/cat.png": ["port or other characters", "the endpoint is the job's own"],
    "s3:///cat.png": ["names no bucket; write s3://bucket/key"],
    "s3://bucket/cat.png#v2": ["'#' fragment"],
    "file://otherhost/etc/passwd": ["file:// URI names no host", "file:///absolute/path"],
    "file:///data/cat.png?x=1": ["carries query options"],
}

ACCEPTED = [
    "s3://bucket/cat.png",
    "s3://my-bucket.example/deep/path/cat%20v2.png",
    "S3://Bucket_1/cat.png",
    "s3a://bucket/cat.png",
    "gs://bucket/cat.png",
    "file:///data/cat.png",
    "file://localhost/data/cat.png",
    "cat.png",
    "/data/inputs/cat.png",
    "~/inputs/cat.png",
    "/data/what?#@:name.png",  # a local path: none of these characters mean anything there
]


def refuse(tmp_path, uri: str, model: str = "tiny-glm-image", column: str = "image") -> str:
    path = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "ok", "prompt": "p", column: "s3://bucket/fine.png"},
            {"id": "x", "prompt": "p", column: uri},
        ],
    )
    with pytest.raises(ManifestError) as refused:
        validate_manifest(ManifestSource(str(path)), resolve_model(model))
    assert len(refused.value.problems) == 1, str(refused.value)
    problem = refused.value.problems[0]
    assert (problem.row, problem.id, problem.column) == (1, "x", column)
    return str(refused.value)


@pytest.mark.parametrize("uri", list(REFUSED))
def test_uris_that_choose_how_to_reach_an_input_are_refused(tmp_path, uri):
    message = refuse(tmp_path, uri)
    assert "m.parquet, row 1, id 'x', column 'image'" in message
    for text in REFUSED[uri]:
        assert text in message, f"{text!r} not in:\n{message}"
    assert SECRET not in message and "AKIAIOSFODNN7EXAMPLE" not in message
    if "?" in uri:
        assert "evil.example.com" not in message  # query values are masked


@pytest.mark.parametrize(
    ("model", "column"),
    [("tiny-cogvideox", "video"), ("tiny-cogvideox-fun", "video"), ("tiny-cogvideox-i2v", "image")],
)
def test_every_input_column_is_checked(tmp_path, model, column):
    message = refuse(tmp_path, "s3://bucket/a.mp4?endpoint_override=evil.example.com", model, column)
    assert f"column '{column}'" in message and "carries query options" in message


def test_a_secret_is_masked_even_where_the_column_is_refused_for_another_reason(tmp_path):
    path = write_manifest(
        tmp_path / "m.parquet", [{"id": "a", "prompt": "p", "image": f"s3://key:{SECRET}@bucket/cat.png"}]
    )
    with pytest.raises(ManifestError) as refused:
        validate_manifest(ManifestSource(str(path)), resolve_model("tiny-cogview4"))
    message = str(refused.value)
    assert "column 'image' = 's3://***@bucket/cat.png': tiny-cogview4 takes no 'image' input" in message
    assert SECRET not in message


def test_plain_object_uris_and_local_paths_are_accepted(tmp_path):
    spec = resolve_model("tiny-glm-image")
    path = write_manifest(
        tmp_path / "m.parquet",
        [{"id": f"r{i}", "prompt": "p", "image": uri} for i, uri in enumerate(ACCEPTED)],
    )
    source = ManifestSource(str(path))
    validate_manifest(source, spec)
    items = [
        item for part in source.batches() for item, _ in work_items(part.batch, spec, RowDefaults("png"))
    ]
    by_id = {item.id: item.image for item in items}
    assert by_id["r0"].startswith("s3://bucket/cat.png")  # the job's endpoint may be added, never the row's
    assert by_id["r5"] == "file:///data/cat.png"
    assert by_id["r7"] == os.path.abspath("cat.png") and by_id["r10"] == "/data/what?#@:name.png"
