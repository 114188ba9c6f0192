"""jobs/: the Ray job entry points read their settings from arguments or the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.dataset as ds

from jobs import status, validate
from jobs.render import arguments
from tests.conftest import ROOT, write_manifest


def test_environment_fills_what_the_arguments_leave_out():
    env = {"COGDIST_MANIFEST": "s3://b/m", "COGDIST_MODEL": "tiny-cogview4", "COGDIST_OUT": "s3://b/o"}
    assert arguments([], env) == ["render", "s3://b/m", "--model", "tiny-cogview4", "--out", "s3://b/o"]
    assert arguments(["local.parquet", "--out", "x", "--replicas", "3"], env) == [
        "render",
        "local.parquet",
        "--out",
        "x",
        "--replicas",
        "3",
        "--model",
        "tiny-cogview4",
    ]
    # An option given as --option=value is given: the environment does not add a second one.
    assert arguments(["--model=m2"], env) == ["render", "s3://b/m", "--model=m2", "--out", "s3://b/o"]


def test_validate_and_status_jobs_take_what_applies_to_them_from_the_environment():
    env = {"COGDIST_MANIFEST": "s3://b/m", "COGDIST_MODEL": "tiny-cogview4", "COGDIST_OUT": "s3://b/o"}
    assert validate.arguments(["--width", "64"], env) == [
        "validate",
        "s3://b/m",
        "--width",
        "64",
        "--model",
        "tiny-cogview4",
    ]
    # status: OUT is its positional argument, the manifest an option; --check makes the exit code
    # say whether the render is complete.
    assert status.arguments([], env) == ["status", "s3://b/o", "--manifest", "s3://b/m", "--check"]
    assert status.arguments(["other"], {}) == ["status", "other", "--check"]


def test_render_job_runs_from_environment(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"j{i}", "prompt": "a job"} for i in range(3)])
    out = tmp_path / "out"
    env = {"COGDIST_MANIFEST": str(manifest), "COGDIST_MODEL": "tiny-cogview4", "COGDIST_OUT": str(out)}
    result = subprocess.run(
        [sys.executable, "jobs/render.py", "--no-progress", "--replicas", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    assert "3 rendered" in result.stdout
    assert result.stdout.rstrip().endswith("cogdist job render: succeeded (exit 0)")
    assert ds.dataset(str(out / "index")).to_table().num_rows == 3
