"""Every bad-manifest case is refused with exit code 2, a message naming row, column and value,
and nothing written to OUT."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from tests.conftest import DEMO, cli, write_manifest

GOOD = {"id": "a", "prompt": "a red fox"}


def rows(*overrides: dict) -> list[dict]:
    return [{**GOOD, "id": f"row-{i}", **o} for i, o in enumerate(overrides)]


CASES = {
    "missing prompt column": (
        [{"id": "a"}],
        None,
        ["column 'prompt'", "required column is missing"],
    ),
    "missing id column": (
        [{"prompt": "x"}],
        None,
        ["column 'id'", "required column is missing"],
    ),
    "wrong type": (
        [{"id": "a", "prompt": 7}],
        pa.schema([("id", pa.string()), ("prompt", pa.int64())]),
        ["column 'prompt'", "has type int64; expected string"],
    ),
    "null id": (
        rows({}, {"id": None}),
        None,
        ["row 1", "column 'id'", "id is missing"],
    ),
    "empty id": (
        rows({}, {}, {"id": ""}),
        None,
        ["row 2", "column 'id'", "= ''", "id is empty"],
    ),
    "null prompt": (
        rows({}, {"prompt": None}),
        None,
        ["row 1", "id 'row-1'", "column 'prompt'", "prompt is missing"],
    ),
    "duplicate id": (
        [{**GOOD, "id": "same"}, {**GOOD, "id": "other"}, {**GOOD, "id": "same"}],
        None,
        ["row 2", "id 'same'", "duplicate id: also at", "row 0"],
    ),
    "width not a multiple": (
        rows({}, {"width": 100}),
        None,
        ["row 1", "column 'width'", "= 100", "not a multiple of 32", "tiny-cogview4 takes"],
    ),
    "height too large": (
        rows({"height": 1024}),
        None,
        ["row 0", "column 'height'", "= 1024", "outside 64..512"],
    ),
    "negative width": (
        rows({"width": -64}),
        None,
        ["row 0", "column 'width'", "= -64"],
    ),
    "zero steps": (
        rows({}, {"num_inference_steps": 0}),
        None,
        ["row 1", "column 'num_inference_steps'", "= 0", "must be a positive integer"],
    ),
    "nan guidance": (
        rows({"guidance_scale": 5.0}, {"guidance_scale": math.nan}),
        None,
        ["row 1", "column 'guidance_scale'", "= nan", "must be a finite number"],
    ),
    "inf guidance": (
        rows({"guidance_scale": math.inf}),
        None,
        ["row 0", "column 'guidance_scale'", "= inf"],
    ),
    "negative seed": (
        rows({"seed": 3}, {"seed": -1}),
        None,
        ["row 1", "column 'seed'", "= -1", "seed must be >= 0"],
    ),
    "frames on an image model": (
        rows({"num_frames": 49}),
        None,
        ["row 0", "column 'num_frames'", "= 49", "makes images"],
    ),
    "image input on a text-only model": (
        rows({}, {"image": "s3://bucket/cat.png"}),
        None,
        ["row 1", "column 'image'", "takes no 'image' input"],
    ),
    "reserved column": (
        rows({"uri": "x"}),
        None,
        ["column 'uri'", "cogdist writes into the index"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_manifest_is_refused_before_anything_is_written(tmp_path, case):
    data, schema, expected = CASES[case]
    manifest = write_manifest(tmp_path / "bad.parquet", data, schema)
    out = tmp_path / "out"
    result = cli("render", str(manifest), "--model", "tiny-cogview4", "--out", str(out), timeout=120)
    assert result.returncode == 2, result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert "bad.parquet" in result.stderr or "column" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), "a refused manifest must not create OUT"


def test_duplicate_ids_across_files_are_refused(tmp_path):
    folder = tmp_path / "manifest"
    write_manifest(folder / "part-0.parquet", [{**GOOD, "id": "x"}, {**GOOD, "id": "y"}])
    write_manifest(folder / "part-1.parquet", [{**GOOD, "id": "z"}, {**GOOD, "id": "x"}])
    result = cli("validate", str(folder), "--model", "tiny-cogview4")
    assert result.returncode == 2
    assert "part-1.parquet, row 1, id 'x', column 'id'" in result.stderr
    assert "also at" in result.stderr and "part-0.parquet row 0" in result.stderr


def test_not_a_parquet_file(tmp_path):
    bogus = tmp_path / "rows.parquet"
    bogus.write_bytes(b"id,prompt\na,b\n")
    result = cli("validate", str(bogus), "--model", "tiny-cogview4")
    assert result.returncode == 2
    assert "rows.parquet" in result.stderr and "not a readable Parquet file" in result.stderr


def test_truncated_parquet_file(tmp_path):
    good = write_manifest(tmp_path / "m.parquet", rows({}, {}, {}))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    result = cli("validate", str(good), "--model", "tiny-cogview4")
    assert result.returncode == 2 and "m.parquet" in result.stderr


def test_no_files_found(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("validate", str(tmp_path / "empty"), "--model", "tiny-cogview4")
    assert result.returncode == 2 and "no Parquet files found" in result.stderr
    result = cli("validate", str(tmp_path / "missing.parquet"), "--model", "tiny-cogview4")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_many_problems_are_counted_and_the_first_listed(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows(*[{"width": 33}] * 50))
    result = cli("validate", str(manifest), "--model", "tiny-cogview4")
    assert result.returncode == 2
    assert "manifest refused: 50 problems" in result.stderr
    assert "... and 30 more" in result.stderr


def test_validate_accepts_the_demo_manifest():
    result = cli("validate", str(DEMO), "--model", "tiny-cogview4")
    assert result.returncode == 0, result.stderr
    assert "24 rows" in result.stdout


def test_sizes_are_checked_against_the_chosen_model(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows({"width": 256, "height": 256}))
    assert cli("validate", str(manifest), "--model", "tiny-cogview4").returncode == 0
    refused = cli("validate", str(manifest), "--model", "THUDM/CogView4-6B")
    assert refused.returncode == 2
    assert "width 256 is outside 512..2048" in refused.stderr


def test_glob_and_folder_manifests(tmp_path):
    write_manifest(tmp_path / "a" / "one.parquet", rows({}, {}))
    write_manifest(tmp_path / "a" / "two.parquet", [{**GOOD, "id": "t"}])
    write_manifest(tmp_path / "a" / "sub" / "three.parquet", [{**GOOD, "id": "s"}])
    folder = cli("validate", str(tmp_path / "a"), "--model", "tiny-cogview4")
    assert folder.returncode == 0 and "4 rows in 3 file(s)" in folder.stdout
    glob = cli("validate", str(tmp_path / "a" / "*.parquet"), "--model", "tiny-cogview4")
    assert glob.returncode == 0 and "3 rows in 2 file(s)" in glob.stdout
