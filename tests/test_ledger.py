"""The index: parts written whole, each id once, readable by pyarrow.dataset at any moment."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from cogdist.errors import ResumeConflictError
from cogdist.options import job_flags
from cogdist.sink.job import JobSettings, check_resume, clear_outputs, write_job_record
from cogdist.sink.ledger import INDEX, RESULT_FIELDS, PartWriter, index_schema, now_utc, read_ids
from cogdist.storage import open_location

MANIFEST = pa.schema(
    [("id", pa.large_string()), ("prompt", pa.string()), ("seed", pa.int32()), ("tag", pa.string())]
)


def index_row(i: int) -> dict:
    return {
        "id": f"r{i}",
        "prompt": "p",
        "tag": "t",
        "uri": f"/o/r{i}.png",
        "path": f"outputs/r{i}.png",
        "seed": i,
        "width": 64,
        "height": 64,
        "num_frames": None,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "model": "m",
        "format": "png",
        "render_seconds": 0.1,
        "finished_at": now_utc(),
        "attempts": 1,
    }


def test_index_schema_keeps_manifest_columns_and_replaces_effective_ones():
    schema = index_schema(MANIFEST)
    assert schema.names[:3] == ["id", "prompt", "tag"]
    assert schema.field("id").type == pa.string()
    assert schema.field("seed").type == pa.int64()  # the effective seed, not the manifest's int32
    assert schema.names[3:] == [f.name for f in RESULT_FIELDS]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_commits_append_parts_and_ids_read_back(tmp_path, where, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        out = open_location(f"s3://{bucket}/job")
    else:
        out = open_location(str(tmp_path))
    writer = PartWriter(out, INDEX, index_schema(MANIFEST))
    assert writer.commit() == 0 and read_ids(out, INDEX).to_pylist() == []
    writer.add([index_row(0), index_row(1)])
    assert writer.commit() == 2
    writer.add([index_row(2)])
    assert writer.commit() == 1
    assert sorted(read_ids(out, INDEX).to_pylist()) == ["r0", "r1", "r2"]
    table = ds.dataset(out.path(INDEX), filesystem=out.fs).to_table()
    assert table.num_rows == 3 and table.schema.field("finished_at").type == pa.timestamp("ms", tz="UTC")


def test_unreadable_part_is_quarantined(tmp_path):
    out = open_location(str(tmp_path))
    writer = PartWriter(out, INDEX, index_schema(MANIFEST))
    writer.add([index_row(0)])
    writer.commit()
    (tmp_path / INDEX / "part-zzz.parquet").write_bytes(b"PAR1 truncated")
    assert read_ids(out, INDEX).to_pylist() == ["r0"]
    assert ds.dataset(str(tmp_path / INDEX)).to_table().num_rows == 1
    assert (tmp_path / "_cogdist" / "quarantine" / "part-zzz.parquet").exists()


def settings(**changes) -> JobSettings:
    base = dict(
        model="tiny-cogview4",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        format="png",
        quality=95,
        dtype="auto",
        columns=["id", "prompt"],
    )
    return JobSettings({**base, **changes}, job_flags())


def test_resume_conflicts_name_each_setting(tmp_path):
    out = open_location(str(tmp_path))
    assert check_resume(out, settings()) is False
    write_job_record(out, settings())
    assert check_resume(out, settings()) is True
    with pytest.raises(ResumeConflictError) as raised:
        check_resume(out, settings(model="THUDM/CogView4-6B", guidance_scale=3.5))
    message = str(raised.value)
    assert "--model: 'tiny-cogview4' in OUT, 'THUDM/CogView4-6B' now" in message
    assert "--guidance: 5.0 in OUT, 3.5 now" in message
    assert "--overwrite" in message and "another --out" in message


def test_clear_outputs_removes_only_what_cogdist_wrote(tmp_path):
    out = open_location(str(tmp_path))
    write_job_record(out, settings())
    out.write_bytes("outputs/aa/x.png", b"x")
    out.write_bytes("index/part-0.parquet", b"x")
    (tmp_path / "notes.txt").write_text("mine")
    clear_outputs(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
