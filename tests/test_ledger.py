"""The index: parts written whole, each id once, readable by pyarrow.dataset at any moment."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
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


def test_corrupt_page_is_quarantined_after_rereads(tmp_path):
    """A part whose data pages are garbage reads as OSError, like a refused request: it is read
    again, and quarantined when it still fails while the store lists it."""
    out = open_location(str(tmp_path))
    writer = PartWriter(out, INDEX, index_schema(MANIFEST))
    writer.add([index_row(i) for i in range(200)])
    writer.commit()
    writer.add([index_row(i) for i in range(200, 400)])
    writer.commit()
    bad = sorted((tmp_path / INDEX).glob("*.parquet"))[1]
    data = bad.read_bytes()
    bad.write_bytes(data[:8] + bytes(200) + data[208:])  # pages corrupt, footer intact
    with pytest.raises(OSError):
        pq.read_table(bad)
    ids = read_ids(out, INDEX).to_pylist()
    assert len(ids) == 200 and len(set(ids)) == 200
    assert (tmp_path / "_cogdist" / "quarantine" / bad.name).exists()


class Refusing(pafs.FileSystemHandler):
    """The local file system, refusing the first `refusals` reads of every file as a store's
    transient error would, or every listing and lookup while `down`."""

    def __init__(self, refusals: int = 0, down: bool = False) -> None:
        self.local = pafs.LocalFileSystem()
        self.refusals, self.down, self.refused = refusals, down, {}

    def _check(self) -> None:
        if self.down:
            raise OSError("AWS Error NETWORK_CONNECTION during HeadObject operation")

    def open_input_file(self, path):
        if self.refused.get(path, 0) < self.refusals:
            self.refused[path] = self.refused.get(path, 0) + 1
            raise OSError("AWS Error ACCESS_DENIED during GetObject operation: 403")
        return self.local.open_input_file(path)

    def get_file_info(self, paths):
        self._check()
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def get_type_name(self):
        return "refusing"

    def normalize_path(self, path):
        return path

    def open_input_stream(self, path):
        return self.open_input_file(path)

    # Writes, moves and deletes go straight to the local disk.
    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def move(self, src, dest):
        self.local.move(src, dest)

    def delete_file(self, path):
        self.local.delete_file(path)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path)

    copy_file = delete_dir = delete_dir_contents = delete_root_dir_contents = open_append_stream = None


@pytest.mark.parametrize("refusals", [1, 2])
def test_transient_read_errors_move_no_part_aside(tmp_path, refusals):
    local = open_location(str(tmp_path))
    writer = PartWriter(local, INDEX, index_schema(MANIFEST))
    for i in range(3):
        writer.add([index_row(i)])
        writer.commit()
    handler = Refusing(refusals=refusals)
    out = dataclasses.replace(local, fs=pafs.PyFileSystem(handler))
    assert sorted(read_ids(out, INDEX).to_pylist()) == ["r0", "r1", "r2"]
    assert sum(handler.refused.values()) >= 3 and not (tmp_path / "_cogdist" / "quarantine").exists()
    handler.down = True
    handler.refused.clear()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        read_ids(out, INDEX)
    assert len(list((tmp_path / INDEX).glob("*.parquet"))) == 3
    assert not (tmp_path / "_cogdist" / "quarantine").exists()


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
