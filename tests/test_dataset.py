"""--dataset webdataset / parquet: shards readable by the standard loaders, exactly once through kills."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

import cogdist
from cogdist.errors import ResumeConflictError, UsageError
from cogdist.reporting.thumbnails import read_thumbnails
from cogdist.sink.dataset import read_sample
from cogdist.storage import open_location
from tests.conftest import committed_rows, driver_env, kill_driver_when, probe_mp4, write_manifest


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"s.{i:03d}/x", "prompt": f"sample {i}", "tag": f"t{i % 2}"} for i in range(start, start + n)
    ]


def index(out: Path) -> list[dict]:
    return ds.dataset(str(out / "index")).to_table().to_pylist()


def tar_members(out: Path) -> dict[str, dict[str, bytes]]:
    """Every member of every shard, by shard name then member name."""
    shards = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            shards[path.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return shards


def test_parquet_dataset_loads_with_hf_datasets_and_resumes_into_new_shards(ray_session, tmp_path):
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "a.parquet", rows(5))
    options = dict(
        model="tiny-cogview4", out=str(out), progress=False, dataset="parquet", shard_size=2, replicas=1
    )
    summary = cogdist.render(str(first), **options)
    assert (summary.done, summary.ok) == (5, True)
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-000000.parquet",
        "train-000001.parquet",
        "train-000002.parquet",
    ]
    assert not (out / "outputs").exists(), "a dataset mode stores no per-row files"

    # A shard a killed run wrote but never indexed: removed on resume, its number reused.
    orphan = out / "data" / "train-000003.parquet"
    pq.write_table(pq.read_table(out / "data" / "train-000000.parquet"), orphan)
    more = write_manifest(tmp_path / "b.parquet", rows(8))
    again = cogdist.render(str(more), **options)
    assert (again.done, again.skipped) == (3, 5)
    assert sorted(p.name for p in (out / "data").iterdir())[-2:] == [
        "train-000003.parquet",
        "train-000004.parquet",
    ]

    loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    assert sorted(loaded["id"]) == sorted(r["id"] for r in rows(8)), "every id exactly once"
    by_id = {r["id"]: r for r in index(out)}
    for sample in loaded:
        assert sample["image"].size == (64, 64) and sample["tag"] in ("t0", "t1")
        row = by_id[sample["id"]]
        assert row["path"].startswith("data/train-") and row["sample_key"] == sample["sample_key"]
        stored = read_sample(open_location(str(out)), row)
        assert hashlib.sha256(stored).hexdigest() == row["sha256"] and len(stored) == row["bytes"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), np.asarray(sample["image"]))

    thumbnails = read_thumbnails(open_location(str(out)), [r["id"] for r in rows(8)])
    assert all(t.still is not None and not t.note for t in thumbnails), [t.note for t in thumbnails]

    with pytest.raises(ResumeConflictError, match="--dataset"):
        cogdist.render(str(more), **{**options, "dataset": "webdataset"})


def test_video_webdataset_shards_hold_mp4_json_and_txt(ray_session, tmp_path):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", rows(3))
    summary = cogdist.render(
        str(manifest),
        model="tiny-cogvideox",
        out=str(out),
        progress=False,
        dataset="webdataset",
        shard_size=2,
        steps=2,
        replicas=1,
    )
    assert summary.ok
    shards = tar_members(out)
    assert list(shards) == ["shard-000000.tar", "shard-000001.tar"]
    names = [name for members in shards.values() for name in members]
    assert len(names) == 9 and Counter(n.rsplit(".", 1)[1] for n in names) == {"mp4": 3, "json": 3, "txt": 3}
    for row in index(out):
        members = shards[Path(row["path"]).name]
        key = row["sample_key"]
        assert "." not in key
        data = members[f"{key}.mp4"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        (tmp_path / "v.mp4").write_bytes(data)
        meta, frames = probe_mp4(tmp_path / "v.mp4")
        assert frames.shape[0] == row["num_frames"] and meta["size"] == (row["width"], row["height"])
        assert json.loads(members[f"{key}.json"])["id"] == row["id"]
        assert members[f"{key}.txt"].decode() == row["prompt"]
    thumbnails = read_thumbnails(open_location(str(out)), [r["id"] for r in rows(3)])
    assert all(t.data_uri.startswith("data:image/webp") for t in thumbnails), [t.note for t in thumbnails]


def test_webdataset_is_exactly_once_through_a_killed_driver(tmp_path):
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", rows(12))
    command = [sys.executable, "-m", "cogdist", "render", str(manifest), "--model", "tiny-cogview4"]
    command += ["--out", str(out), "--dataset", "webdataset", "--shard-size", "3", "--replicas", "1"]
    command += ["--no-progress"]
    kill_driver_when(command, lambda: committed_rows(str(out)) >= 3, env=driver_env())
    assert 3 <= committed_rows(str(out)) < 12
    import subprocess

    finished = subprocess.run(command, env=driver_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr

    shards = tar_members(out)
    keys = Counter(
        name.split(".")[0] for members in shards.values() for name in members if name.endswith(".png")
    )
    table = index(out)
    assert len(table) == 12 and len({r["id"] for r in table}) == 12
    assert sorted(keys) == sorted(r["sample_key"] for r in table) and set(keys.values()) == {1}
    assert {r["path"] for r in table} == {f"shards/{name}" for name in shards}, "no shard outside the index"

    loaded = datasets.load_dataset("webdataset", data_files=str(out / "shards" / "*.tar"), split="train")
    assert sorted(s["json"]["id"] for s in loaded) == sorted(r["id"] for r in rows(12))
    assert all(s["png"].size == (64, 64) and s["txt"] == s["json"]["prompt"] for s in loaded)


def test_dataset_options_are_checked(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    with pytest.raises(UsageError, match="--shard-size"):
        cogdist.validate(str(manifest), model="tiny-cogview4", dataset="parquet", shard_size=0)
    with pytest.raises(UsageError, match="--save-frames"):
        cogdist.validate(str(manifest), model="tiny-cogvideox", dataset="webdataset", save_frames=True)
