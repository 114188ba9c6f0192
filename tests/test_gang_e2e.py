"""Sequence-parallel gangs through the engine and the CLI: same pixels, refusals, lost members."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from cogdist import engine
from cogdist.options import RenderOptions
from tests.conftest import cli, read_table, write_manifest
from tests.faults import dying_member, hanging_member, unreadable_on_one_rank
from tests.inprocess import render_in_process

PIXELS = 2


def rows(n: int) -> list[dict]:
    return [{"id": f"g/{i}", "prompt": f"a lighthouse at dusk number {i}"} for i in range(n)]


def pixels(out, table, item_id: str, column: str = "path") -> np.ndarray:
    row = table.filter(ds.field("id") == item_id).to_pylist()[0]
    return np.asarray(Image.open(f"{out}/{row[column]}"), dtype=int)


def test_sp2_with_compiled_blocks_renders_match_one_gpu(ray_session, tmp_path):
    """--sp 2 with the blocks compiled (--compile), through the engine on the session's Ray,
    against the rows rendered alone by one in-process worker. A gang of two: each rank compiles
    on its own, and --cfg-parallel only halves the batch the compiled blocks see (the video gang
    test runs --sp 2 --cfg-parallel through the CLI; tests/test_parallel_render.py each layout)."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(3))
    reference = render_in_process(rows(3), "tiny-cogview4", tmp_path / "sp1", steps=3)
    out = tmp_path / "gang"
    options = RenderOptions(str(manifest), "tiny-cogview4", str(out), replicas=1, steps=3, sp=2, compile=True)
    summary = engine.run(replace(options, progress=False))
    assert summary.ok, summary.describe()
    assert summary.compile_seconds > 0
    table = read_table(str(out))[0]
    assert sorted(table["id"].to_pylist()) == ["g/0", "g/1", "g/2"]
    assert sum(table["compile_seconds"].to_pylist()) == pytest.approx(summary.compile_seconds)
    for item_id in ("g/0", "g/1", "g/2"):
        difference = np.abs(pixels(out, table, item_id) - reference[item_id]).max()
        assert difference <= PIXELS, f"{item_id}: {difference}"


def test_video_gang_with_cfg_parallel_matches_one_gpu(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    settings = ["--replicas", "1", "--steps", "2", "--frames", "9", "--save-frames", "--no-progress"]
    done = cli(
        "render",
        str(manifest),
        "--model",
        "tiny-cogvideox",
        "--out",
        str(tmp_path / "gang"),
        *settings,
        "--sp",
        "2",
        "--cfg-parallel",
        own_ray=True,  # a gang of 4: the embedded instance takes that many CPUs, the shared head has 2
    )
    assert done.returncode == 0, done.stderr
    render_in_process(rows(1), "tiny-cogvideox", tmp_path / "sp1", steps=2, frames=9, save_frames=True)
    frames = {name: sorted((tmp_path / name / "outputs").rglob("*.png")) for name in ("sp1", "gang")}
    assert len(frames["sp1"]) == len(frames["gang"]) == 9
    for one, gang in zip(frames["sp1"], frames["gang"]):
        difference = np.abs(np.asarray(Image.open(one), int) - np.asarray(Image.open(gang), int)).max()
        assert difference <= PIXELS, (one.name, difference)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sp", "7"], "has 6 attention heads"),
        (["--sp", "4"], "do not split 4 ways"),
        (["--sp", "0"], "--sp must be at least 1"),
    ],
)
def test_an_sp_the_model_cannot_take_is_refused_before_any_gang(tmp_path, flags, message):
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    done = cli("render", str(manifest), "--model", "tiny-cogview4", "--out", str(tmp_path / "out"), *flags)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


def run_with_fault(tmp_path, worker: type, marker: str, n: int, **options):
    """A 2-rank gang of `worker` renders n rows; returns (summary, index table) once the fault
    has been injected (its marker file exists)."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(n))
    out = tmp_path / "out"
    options = RenderOptions(
        str(manifest), "tiny-cogview4", str(out), progress=False, replicas=1, sp=2, **options
    )
    summary = engine.run(options, worker_class=worker)
    assert (tmp_path / marker).exists(), "the fault was not injected"
    table, _ = read_table(str(out))
    return summary, table


def test_a_gang_member_killed_mid_render_rebuilds_the_gang(ray_session, tmp_path):
    """Rank 1 dies mid-denoising g/1, later rank 0 (the writer) g/3: the gang is rebuilt each time
    and the rows render, neither charged an attempt."""
    worker = dying_member(tmp_path, {"g/1": 1, "g/3": 0})
    summary, table = run_with_fault(tmp_path, worker, "died-g_3", 5, steps=3, max_retries=0)
    assert (tmp_path / "died-g_1").exists(), "rank 1 did not die"
    assert (summary.done, summary.failed, summary.ok) == (5, 0, True)
    assert sorted(table["id"].to_pylist()) == [f"g/{i}" for i in range(5)]
    for victim in ("g/1", "g/3"):  # a crash is no attempt
        assert table.filter(ds.field("id") == victim).to_pylist()[0]["attempts"] == 1, victim


def test_a_hung_gang_member_times_out_and_the_gang_is_rebuilt(ray_session, tmp_path):
    worker = hanging_member(tmp_path, victim="g/1", rank=1)
    summary, table = run_with_fault(tmp_path, worker, "hung", 3, steps=2, max_retries=0, collective_timeout=5)
    assert (summary.done, summary.failed, summary.ok) == (3, 0, True)
    assert sorted(table["id"].to_pylist()) == ["g/0", "g/1", "g/2"]


def test_an_input_unreadable_on_one_rank_fails_the_row_on_every_rank(ray_session, tmp_path):
    """The gang does not split over it (that would stall until the collective timeout): the row
    fails as a row, is retried, and renders."""
    worker = unreadable_on_one_rank(tmp_path, victim="g/1", rank=1)
    summary, table = run_with_fault(
        tmp_path, worker, "unreadable", 3, steps=2, max_retries=1, collective_timeout=60
    )
    assert (summary.done, summary.failed, summary.ok) == (3, 0, True)
    assert sorted(table["id"].to_pylist()) == ["g/0", "g/1", "g/2"]
    assert table.filter(ds.field("id") == "g/1").to_pylist()[0]["attempts"] == 2  # failed once, as a row
