"""An OUT written by cogdist 0.1.0 (before the options were declared in one place) still resumes.

`tests/data/out-0.1.0` is such an OUT, committed whole: a job of `tiny-cogview4` with
`--vae-tiling`, both rows rendered, its `_cogdist/job.json` as 0.1.0 wrote it. The job record's
keys are a contract: a resume with the original settings finds nothing to do, one with another
output-changing setting is refused naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cogdist import render, status
from cogdist.errors import ResumeConflictError

FIXTURE = Path(__file__).parent / "data" / "out-0.1.0"
RECORDED_KEYS = [
    "model",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "format",
    "quality",
    "dtype",
    "columns",
    "num_frames",
    "fps",
    "vae_tiling",
    "save_frames",
    "dataset",
    "cache",
    "cache_threshold",
]


@pytest.fixture
def old_out(tmp_path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "job")
    return tmp_path / "job"


def test_the_fixture_is_what_0_1_0_wrote():
    record = json.loads((FIXTURE / "out" / "_cogdist" / "job.json").read_text())
    assert record["cogdist_version"] == "0.1.0"
    assert list(record["settings"]) == RECORDED_KEYS


def test_an_old_out_resumes_with_its_settings(old_out):
    manifest, out = str(old_out / "manifest.parquet"), str(old_out / "out")
    summary = render(manifest, model="tiny-cogview4", out=out, vae_tiling=True, progress=False)
    assert (summary.done, summary.skipped, summary.total, summary.ok) == (0, 2, 2, True)
    assert status(out, manifest).pending == 0
    # The record is left as it was: a resume does not rewrite it.
    before = (FIXTURE / "out" / "_cogdist" / "job.json").read_bytes()
    assert (old_out / "out" / "_cogdist" / "job.json").read_bytes() == before


def test_an_old_out_refuses_other_output_settings(old_out):
    manifest, out = str(old_out / "manifest.parquet"), str(old_out / "out")
    with pytest.raises(ResumeConflictError, match=r"--vae-tiling: True in OUT, False now"):
        render(manifest, model="tiny-cogview4", out=out, progress=False)
    with pytest.raises(ResumeConflictError, match=r"--steps: 4 in OUT, 6 now"):
        render(manifest, model="tiny-cogview4", out=out, vae_tiling=True, steps=6, progress=False)
