"""End to end through the CLI in subprocesses, each with its own embedded Ray instance."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from PIL import Image

from tests.conftest import DEMO, ROOT, cli, kill_after_first_commit, read_table, write_manifest

pytestmark = pytest.mark.e2e


def decode(location, path: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(location.read_bytes(path))).convert("RGB"))


def test_demo_render_then_rerun_renders_nothing(tmp_path):
    out = tmp_path / "out"
    first = cli("render", str(DEMO), "--model", "tiny-cogview4", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "24 rendered, 0 already done, 0 failed of 24 rows" in first.stdout
    assert "render: 100%" in first.stderr and "item/s" in first.stderr  # the progress bar
    # The embedded instance keeps Ray's token auth on, without Ray's warning on every run.
    assert "Token authentication" not in first.stderr

    table, location = read_table(str(out))
    assert table.num_rows == 24 and len(set(table["id"].to_pylist())) == 24
    assert {"uri", "seed", "width", "height", "model", "render_seconds", "category"} <= set(
        table.column_names
    )
    demo = ds.dataset(str(DEMO)).to_table()
    categories = dict(zip(demo["id"].to_pylist(), demo["category"].to_pylist()))
    for row in table.to_pylist():
        assert row["category"] == categories[row["id"]]  # the extra column, carried unchanged
        assert decode(location, row["path"]).shape == (row["height"], row["width"], 3)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "outputs").rglob("*.png")}
    assert len(mtimes) == 24

    second = cli("render", str(DEMO), "--model", "tiny-cogview4", "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert "0 rendered, 24 already done" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "outputs").rglob("*.png")} == mtimes
    assert read_table(str(out))[0].num_rows == 24

    status = cli("status", str(out), "--manifest", str(DEMO))
    assert status.returncode == 0 and "done     24" in status.stdout and "pending  0" in status.stdout

    conflict = cli("render", str(DEMO), "--model", "tiny-cogview4", "--out", str(out), "--guidance", "7")
    assert conflict.returncode == 2 and "--guidance: 5.0 in OUT, 7.0 now" in conflict.stderr

    # A real checkpoint never renders on CPUs under --device auto: the embedded instance, which
    # has no GPU here and will not get one, refuses it before loading anything.
    prompts = write_manifest(tmp_path / "prompts.parquet", [{"id": "a", "prompt": "a cat"}])
    large = cli("render", str(prompts), "--model", "THUDM/CogVideoX-5b", "--out", str(tmp_path / "large"))
    assert large.returncode == 2, large.stderr
    assert "too large to render on CPUs" in large.stderr and "--device cpu" in large.stderr


def kill_manifest(tmp_path: Path, n: int = 24) -> Path:
    # The kill follows the first commit, which holds the first unit or two; the next commit comes
    # --commit-interval later, so rows remain to resume on a machine of any speed.
    rows = [{"id": f"kill/{i:03d}", "prompt": f"scene {i} " + "x" * (i % 17)} for i in range(n)]
    return write_manifest(tmp_path / "kill.parquet", rows)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_mid_run_then_resume_indexes_every_id_once(tmp_path, where, request):
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        out = f"s3://{bucket}/job"
    else:
        out = str(tmp_path / "out")
    manifest = kill_manifest(tmp_path)
    command = [
        sys.executable,
        "-m",
        "cogdist",
        "render",
        str(manifest),
        "--model",
        "tiny-cogview4",
        "--out",
        out,
        "--no-progress",
    ]
    committed = kill_after_first_commit(command, out)
    assert 0 < committed < 24

    # index/ may lag the journal by one fold (the kill can fall between them), but it never
    # shows an id twice, and what it shows is committed.
    after_kill, _ = read_table(out)
    assert after_kill.num_rows <= committed
    assert len(set(after_kill["id"].to_pylist())) == after_kill.num_rows  # exactly once, even now

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed} already done" in resumed.stdout  # the journal's rows count as done

    table, location = read_table(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == [f"kill/{i:03d}" for i in range(24)]  # every id, once
    for row in table.to_pylist():
        assert decode(location, row["path"]).shape == (row["height"], row["width"], 3)
    # Outputs rendered but not indexed before the kill were re-rendered under the same name:
    # nothing stray remains beside the indexed outputs.
    stored = [
        info.path
        for info in location.fs.get_file_info(pafs.FileSelector(location.path("outputs"), recursive=True))
        if info.type.name == "File"
    ]
    assert len(stored) == 24


def test_models_lists_the_presets():
    result = cli("models")
    assert result.returncode == 0
    assert "tiny-cogview4" in result.stdout and "THUDM/CogView4-6B" in result.stdout


def test_unknown_model_is_refused_clearly(tmp_path):
    result = cli("render", str(DEMO), "--model", "no-such-model", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown model 'no-such-model'" in result.stderr
    assert not (tmp_path / "o").exists()
