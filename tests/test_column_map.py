"""--column-map (manifest columns under cogdist's names) and jobs that feed jobs (an index read
as a manifest): through the CLI where the point is the command, in process where it is a check."""

from __future__ import annotations

import array
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import cogdist
from cogdist.engine import plan
from cogdist.errors import EXIT_REFUSED, ManifestError, ResumeConflictError, UsageError
from cogdist.manifest import ManifestSource
from cogdist.options import RenderOptions
from cogdist.sink.job import write_job_record
from cogdist.storage import open_location
from cogdist.work import derive_seed
from tests.conftest import cli, probe_mp4, write_manifest
from tests.inprocess import render_in_process

LAION = [
    {"key": "000/a", "caption": "a red boat", "aesthetic": 6.5},
    {"key": "000/b", "caption": "a tall tree at dusk", "aesthetic": 5.1},
]
QUIET = {"progress": False, "replicas": 1}


def test_a_mapped_manifest_renders_as_the_same_rows_under_cogdist_names(tmp_path):
    manifest = write_manifest(tmp_path / "laion.parquet", LAION)
    out = tmp_path / "out"
    # One worker with one thread, as the in-process reference: the same pixels, byte for byte.
    run = cli(
        "render", str(manifest), "--model", "tiny-cogview4", "--out", str(out), "--replicas", "1",
        "--cpus-per-worker", "1", "--column-map", "id=key,prompt=caption",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    index = ds.dataset(out / "index").to_table()
    assert {"id", "key", "caption", "prompt", "aesthetic"} <= set(index.column_names)
    rows = {row["id"]: row for row in index.to_pylist()}
    assert sorted(rows) == ["000/a", "000/b"]
    for source in LAION:
        row = rows[source["key"]]
        assert (row["key"], row["caption"], row["prompt"]) == (
            source["key"],
            source["caption"],
            source["caption"],
        )
        assert row["aesthetic"] == source["aesthetic"] and row["seed"] == derive_seed(source["key"])

    reference = tmp_path / "reference"
    named = [{"id": r["key"], "prompt": r["caption"], "aesthetic": r["aesthetic"]} for r in LAION]
    render_in_process(named, "tiny-cogview4", reference, threads=1)
    for row in rows.values():
        assert row["sha256"] == hashlib.sha256((reference / row["path"]).read_bytes()).hexdigest()

    record = json.loads((out / "_cogdist" / "job.json").read_text())["settings"]
    assert record["column_map"] == {"id": "key", "prompt": "caption"}
    assert record["columns"] == ["key", "id", "caption", "prompt", "aesthetic"]
    # `status` reads the manifest through the job's map (the manifest itself has no `id`).
    status = cogdist.status(str(out), str(manifest))
    assert (status.done, status.pending) == (2, 0)


def unchecked_strings(values: list[bytes]) -> pa.Array:
    """A string array holding `values` as they are (Arrow does not check UTF-8 when built so)."""
    offsets = array.array("i", [0])
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )


def refusal(manifest, column_map: str, model: str = "tiny-cogview4") -> str:
    with pytest.raises((ManifestError, UsageError)) as refused:
        cogdist.validate(str(manifest), model=model, column_map=column_map)
    assert refused.value.exit_code == EXIT_REFUSED
    return str(refused.value)


def test_maps_that_cannot_be_read_are_refused_naming_the_columns(tmp_path):
    manifest = write_manifest(tmp_path / "laion.parquet", LAION)
    check = cli("validate", str(manifest), "--model", "tiny-cogview4", "--column-map", "id=key,prompt=text")
    assert check.returncode == EXIT_REFUSED
    assert (
        "--column-map prompt=text: the manifest has no column 'text' (columns: key, caption, aesthetic)"
        in (check.stderr)
    )
    assert "mapped twice (prompt=caption, negative_prompt=caption)" in refusal(
        manifest, "id=key,prompt=caption,negative_prompt=caption"
    )
    assert "'colour' is not a column cogdist reads" in refusal(manifest, "id=key,colour=caption")
    assert "is not NAME=COLUMN" in refusal(manifest, "id=key,caption")
    both = write_manifest(tmp_path / "both.parquet", [{**LAION[0], "prompt": "another"}])
    assert (
        "--column-map prompt=caption: the manifest also has a column 'prompt', so 'prompt' would be "
        "ambiguous; drop prompt=caption from the map or rename the manifest's 'prompt'"
    ) in refusal(both, "id=key,prompt=caption")

    # A bad value is named by both names, and text that is not UTF-8 is flagged once (the column
    # under its own name is the same array).
    bad = tmp_path / "bad.parquet"
    table = pa.table({"key": ["a", "b", "c"], "caption": unchecked_strings([b"ok", b"\xff\xfe", b""])})
    pq.write_table(table.set_column(1, "caption", pa.array(["ok", None, "x"])), bad)
    assert "row 1, id 'b', column 'caption' (as prompt): prompt is missing" in refusal(
        bad, "id=key,prompt=caption"
    )
    pq.write_table(table, bad)
    text = refusal(bad, "id=key,prompt=caption")
    assert "manifest refused: 1 problem\n" in text
    assert "row 1, id 'b', column 'caption' (as prompt) = " in text and "is not valid UTF-8 text" in text


def test_a_resume_with_another_map_is_refused(tmp_path):
    manifest = write_manifest(tmp_path / "laion.parquet", [{**r, "title": r["caption"]} for r in LAION])
    out = tmp_path / "out"
    first = RenderOptions(str(manifest), "tiny-cogview4", str(out), column_map="id=key,prompt=caption")
    job = plan(first)
    write_job_record(job.out, job.settings)
    with pytest.raises(ResumeConflictError, match="--column-map") as refused:
        cogdist.render(str(manifest), model="tiny-cogview4", out=str(out), column_map="id=key,prompt=title")
    assert "'prompt': 'caption'" in str(refused.value) and "'prompt': 'title'" in str(refused.value)
    assert not (out / "index").exists()


STILLS = [
    {"id": "still/0", "prompt": "a lighthouse", "seed": 7, "width": 96, "tag": "sea"},
    {"id": "still/1", "prompt": "a windmill", "seed": 8, "width": None, "tag": "land"},
]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_index_of_a_job_is_the_manifest_of_the_next(ray_session, tmp_path, where, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        out1, out2 = f"s3://{bucket}/stills", f"s3://{bucket}/clips"
    else:
        out1, out2 = str(tmp_path / "stills"), str(tmp_path / "clips")
    manifest = write_manifest(tmp_path / "stills.parquet", STILLS)
    assert cogdist.render(str(manifest), model="tiny-cogview4", out=out1, steps=2, **QUIET).ok
    run = cli(
        "render", f"{out1}/index", "--model", "tiny-cogvideox-i2v", "--column-map", "image=uri", "--out", out2
    )
    assert run.returncode == 0, run.stderr

    first, location1 = read_index(out1)
    second, location2 = read_index(out2)
    stills = {row["id"]: row for row in first.to_pylist()}
    assert {"src_uri", "src_seed", "src_width", "src_tag", "src_model", "src_sha256", "image"} <= set(
        second.column_names
    )
    assert "tag" not in second.column_names  # every column of the index is carried as src_
    for row in second.to_pylist():
        still = stills[row["id"]]
        assert row["prompt"] == still["prompt"] and row["src_tag"] == still["tag"]
        assert row["image"] == row["src_uri"] == still["uri"]
        assert (row["src_seed"], row["src_width"], row["src_num_inference_steps"]) == (
            still["seed"],
            still["width"],
            2,
        )
        # This job's settings, not the stills': the seed derived from the id, its own size and steps.
        assert row["seed"] == derive_seed(row["id"]) and (row["width"], row["height"]) == (64, 64)
        assert row["num_inference_steps"] == 4 and row["model"] == "tiny-cogvideox-i2v"
        video = tmp_path / f"{row['sha256']}.mp4"
        video.write_bytes(location2.read_bytes(row["path"]))
        meta, frames = probe_mp4(video)
        assert frames.shape == (9, 64, 64, 3) and np.ptp(frames) > 0
    assert sorted(stills) == sorted(second["id"].to_pylist())
    assert cogdist.status(out2, f"{out1}/index").pending == 0  # read through the job's map
    # `path` is relative to OUT1: refused, pointing at `uri`.
    text = refusal(f"{out1}/index", "image=path", model="tiny-cogvideox-i2v")
    assert "column 'path' (as image)" in text and "map its uri instead (--column-map image=uri)" in text


def read_index(out: str):
    location = open_location(out)
    return ds.dataset(location.path("index"), filesystem=location.fs).to_table(), location


def test_an_index_of_shards_cannot_feed_a_job_by_its_uri(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "stills.parquet", STILLS[:1])
    out1 = tmp_path / "stills"
    assert cogdist.render(
        str(manifest), model="tiny-cogview4", out=str(out1), dataset="webdataset", **QUIET
    ).ok
    text = refusal(out1 / "index", "image=uri", model="tiny-cogvideox-i2v")
    # (The value, the shard's URI, is shortened in the message when its path is long.)
    assert "row 0, id 'still/0', column 'uri' (as image)" in text and "its sample_key 'still-0_" in text
    assert "stored this row inside a shard" in text and "--dataset files to chain it" in text


def test_the_view_shows_mapped_columns_twice_and_reads_only_what_is_asked(tmp_path):
    manifest = write_manifest(tmp_path / "laion.parquet", LAION)
    source = ManifestSource(str(manifest), column_map={"id": "key", "prompt": "caption"})
    assert source.schema.names == ["key", "id", "caption", "prompt", "aesthetic"]
    assert source.view.read_columns(["id"]) == ["key"]
    [part] = source.batches(columns=["id"])
    assert part.batch.schema.names == ["id"] and part.batch.column(0).to_pylist() == ["000/a", "000/b"]
    [part] = source.batches()
    assert part.batch.column("prompt") is not None
    assert (
        part.batch.column("prompt").buffers()[2].address == part.batch.column("caption").buffers()[2].address
    )
