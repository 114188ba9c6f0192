"""--samples N: N outputs of every manifest row, sample 0 the row itself and sample k a row of its
own (id `<id>#k`, seed from the row's); they resume, fail and are stored as rows. Rows that share
a prompt share one text-encoder pass."""

from __future__ import annotations

import hashlib
import tarfile

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

import cogdist
from cogdist.cli import build_parser
from cogdist.errors import ManifestError, ResumeConflictError
from cogdist.manifest import ManifestSource
from cogdist.manifest.rows import RowDefaults
from cogdist.models.prompts import prompt_cache
from cogdist.models.registry import PRESETS
from cogdist.scheduler.pending import pending_rows, scan_pending
from cogdist.work import WorkUnit, derive_seed, sample_seed
from tests.conftest import cli, write_manifest
from tests.inprocess import in_process_worker, render_in_process

ROWS = [{"id": "a", "prompt": "a red fox", "seed": 3}, {"id": "b", "prompt": "an owl at night"}]


def test_sample_zero_is_the_row_and_sample_k_is_the_row_seeded_by_the_rule(tmp_path):
    samples = render_in_process(ROWS[:1], "tiny-cogview4", tmp_path / "samples", samples=3)
    assert sorted(samples) == ["a", "a#1", "a#2"]
    alone = render_in_process(ROWS[:1], "tiny-cogview4", tmp_path / "alone")
    np.testing.assert_array_equal(samples["a"], alone["a"])
    # Sample k is the same row with the documented seed: sha256(f"{seed}#{k}")[:8] >> 1.
    assert sample_seed(3, 2) == int.from_bytes(hashlib.sha256(b"3#2").digest()[:8], "big") >> 1
    reseeded = [{"id": "x", "prompt": "a red fox", "seed": sample_seed(3, 2)}]
    np.testing.assert_array_equal(
        samples["a#2"], render_in_process(reseeded, "tiny-cogview4", tmp_path / "x")["x"]
    )
    assert (
        np.abs(samples["a#1"] - samples["a"]).max() > 10
        and np.abs(samples["a#2"] - samples["a#1"]).max() > 10
    )


def test_a_manifest_id_that_is_a_samples_id_is_refused(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.parquet", [*ROWS, {"id": "a#1", "prompt": "x"}, {"id": "b#4", "prompt": "y"}]
    )
    options = {"model": "tiny-cogview4", "samples": 2}
    with pytest.raises(ManifestError) as refused:
        cogdist.validate(str(manifest), **options)
    text = str(refused.value)
    assert "row 2, id 'a#1', column 'id': is the id of sample 1 of row 'a' under --samples 2" in text
    assert "b#4" not in text  # sample 4 exists only from --samples 5 on
    assert "b#4" in str(
        pytest.raises(ManifestError, cogdist.validate, str(manifest), model="tiny-cogview4", samples=5).value
    )
    assert cogdist.validate(str(manifest), model="tiny-cogview4").rows == 4  # one sample: no sample ids


def test_the_pending_scan_resumes_each_sample_of_each_row(tmp_path):
    """A resume renders exactly the samples not yet done (nor failed), a row's samples in a row."""
    manifest = write_manifest(tmp_path / "m.parquet", [*ROWS, {"id": "c", "prompt": "a lighthouse"}])
    source = ManifestSource(str(manifest))
    done = pa.array(["a", "b#1", "c", "c#1", "c#2"])
    failed = pa.array(["a#2", "c"])  # c is done since it failed: done wins
    pending = scan_pending(source, done, failed, samples=3)
    assert (pending.total, pending.done, pending.failed, pending.pending) == (9, 5, 1, 3)
    rows = list(pending_rows(source, pending, PRESETS["tiny-cogview4"], RowDefaults("png", samples=3)))
    assert [item.id for item, _ in rows] == ["a#1", "b", "b#2"]
    [a1, b0, b2] = [item for item, _ in rows]
    assert (a1.sample_index, a1.source_id, a1.seed) == (1, "a", sample_seed(3, 1))
    assert (b0.sample_index, b0.source_id, b0.seed) == (0, None, derive_seed("b"))
    assert b2.seed == sample_seed(derive_seed("b"), 2) and b2.output != b0.output


def test_samples_through_the_engine_resume_and_are_a_job_setting(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    options = {"model": "tiny-cogview4", "out": str(out), "progress": False, "replicas": 1, "samples": 2}
    first = cogdist.render(str(manifest), **options)
    assert (first.total, first.done, first.ok) == (4, 4, True)
    index = ds.dataset(str(out / "index")).to_table().to_pylist()
    assert sorted((r["id"], r["sample_index"], r["source_id"]) for r in index) == [
        ("a", 0, "a"), ("a#1", 1, "a"), ("b", 0, "b"), ("b#1", 1, "b"),
    ]  # fmt: skip
    assert len({r["path"] for r in index}) == 4 and all((out / r["path"]).exists() for r in index)
    assert {r["id"]: r["seed"] for r in index}["a#1"] == sample_seed(3, 1)
    again = cogdist.render(str(manifest), **options)
    assert (again.done, again.skipped) == (0, 4)
    status = cli("status", str(out), "--manifest", str(manifest), "--check")
    assert status.returncode == 0 and "done     4" in status.stdout and "pending  0" in status.stdout
    with pytest.raises(ResumeConflictError, match="--samples: 2 in OUT, 3 now"):
        cogdist.render(str(manifest), **{**options, "samples": 3})


@pytest.mark.parametrize("dataset", ["webdataset", "parquet"])
def test_samples_are_rows_of_both_dataset_formats(ray_session, tmp_path, dataset):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    summary = cogdist.render(
        str(manifest),
        model="tiny-cogview4",
        out=str(out),
        progress=False,
        replicas=1,
        samples=3,
        dataset=dataset,
    )
    assert summary.ok and summary.done == 6
    index = {r["id"]: r for r in ds.dataset(str(out / "index")).to_table().to_pylist()}
    assert sorted(index) == ["a", "a#1", "a#2", "b", "b#1", "b#2"]
    if dataset == "webdataset":
        keys = set()
        for shard in (out / "shards").glob("*.tar"):
            with tarfile.open(shard) as tar:
                keys |= {m.name.partition(".")[0] for m in tar.getmembers()}
        assert keys == {r["sample_key"] for r in index.values()}
    else:
        loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
        assert sorted(loaded["id"]) == sorted(index) and sorted(loaded["source_id"]) == ["a"] * 3 + ["b"] * 3


def test_rows_sharing_a_prompt_share_one_encoder_pass(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "a red fox", "seed": i} for i in range(3)]
    worker, _, pending = in_process_worker(rows, "tiny-cogview4", tmp_path / "unit", batch_size=3)
    worker.setup()
    [result] = [worker.render(WorkUnit(0, tuple(item for item, _ in pending)))]
    assert all(r.ok for r in result.items)
    assert prompt_cache(worker.pipe).passes == 1  # one pass for three rows
    # A row's samples rendered one per unit (--batch-size 1) reuse the encoding too.
    worker, _, pending = in_process_worker(rows[:1], "tiny-cogview4", tmp_path / "samples", samples=3)
    worker.setup()
    for number, (item, _) in enumerate(pending):
        assert worker.render(WorkUnit(number, (item,))).items[0].ok
    assert len(pending) == 3 and prompt_cache(worker.pipe).passes == 1


def test_the_reports_thumbnail_count_keeps_its_old_spelling():
    parser = build_parser()
    assert parser.parse_args(["report", "o", "--thumbnails", "5"]).thumbnails == 5
    assert parser.parse_args(["report", "o", "--samples", "7"]).thumbnails == 7
