"""End to end through the CLI in subprocesses: a first render on its own embedded Ray instance,
the other runs joining the test process's shared head. A driver SIGKILLed with its embedded
instance, on a folder and on S3, then resumed, is tests/chaos/test_driver_kills.py's (five kills
each, one of every kind, every id once after each and at the end, nothing left running)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from tests.conftest import DEMO, cli, read_table, write_manifest

pytestmark = pytest.mark.e2e


def decode(location, path: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(location.read_bytes(path))).convert("RGB"))


def test_demo_render_then_rerun_renders_nothing(tmp_path):
    out = tmp_path / "out"
    first = cli("render", str(DEMO), "--model", "tiny-cogview4", "--out", str(out), own_ray=True)
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
    large = cli(
        "render",
        str(prompts),
        "--model",
        "THUDM/CogVideoX-5b",
        "--out",
        str(tmp_path / "large"),
        own_ray=True,
    )
    assert large.returncode == 2, large.stderr
    assert "too large to render on CPUs" in large.stderr and "--device cpu" in large.stderr


def test_models_lists_the_presets():
    result = cli("models")
    assert result.returncode == 0
    assert "tiny-cogview4" in result.stdout and "THUDM/CogView4-6B" in result.stdout


def test_unknown_model_is_refused_clearly(tmp_path):
    result = cli("render", str(DEMO), "--model", "no-such-model", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown model 'no-such-model'" in result.stderr
    assert not (tmp_path / "o").exists()
