"""Every tiny preset and task renders exactly what it rendered when the goldens were recorded.

`tests/data/golden_outputs.json` holds the sha256 of every output of a fixed manifest per tiny
preset and task (the file's bytes, as the index records them, and its decoded pixels), recorded
before the structure of cogdist changed; a refactoring that changes one pixel fails here. Rendered
in process (`tests.inprocess`), so the goldens pin the worker's path, not Ray's.

The figures hold for the machine and library versions they were recorded with (see the file's
`recorded_on`): float kernels differ between CPU generations. Re-record with
`python -m tests.test_golden_outputs --write` only for a change that is meant to change pixels.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogdist.sink.encode import encode_video

GOLDEN = Path(__file__).parent / "data" / "golden_outputs.json"


def _inputs(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray((np.random.RandomState(1).rand(80, 96, 3) * 255).astype(np.uint8))
    picture.save(folder / "cond.png")
    x = np.linspace(0, 200, 64)[None, :, None]
    clip = np.stack([np.broadcast_to(x + 5 * i, (64, 64, 3)) for i in range(13)]).astype(np.uint8)
    (folder / "clip13.mp4").write_bytes(encode_video(clip, fps=8.0))
    (folder / "clip9.mp4").write_bytes(encode_video(clip[:9], fps=8.0))
    return {p.name: str(p) for p in folder.iterdir()}


def cases(inputs: dict[str, str]) -> dict[str, tuple[str, list[dict], dict]]:
    """name -> (model, rows, options): every tiny preset, every task it renders."""
    prompts = ["a red fox in snow", 'a sign that reads "open"']
    text = [{"id": f"t{i}", "prompt": p, "seed": 10 + i} for i, p in enumerate(prompts)]
    return {
        "cogview4/text-to-image": ("tiny-cogview4", text, {}),
        "cogview4/text-to-image/jpeg-96x64": (
            "tiny-cogview4",
            text[:1],
            {"format": "jpeg", "width": 96, "height": 64},
        ),
        "cogvideox/text-to-video": ("tiny-cogvideox", text, {}),
        "cogvideox/video-to-video": (
            "tiny-cogvideox",
            [{"id": "v", "prompt": "snow falls", "video": inputs["clip9.mp4"], "seed": 3, "strength": 0.7}],
            {},
        ),
        "cogvideox1.5/text-to-video": ("tiny-cogvideox1.5", text[:1], {}),
        "cogvideox1.5/video-to-video": (
            "tiny-cogvideox1.5",
            [{"id": "v", "prompt": "snow", "video": inputs["clip13.mp4"], "num_frames": 13, "seed": 4}],
            {},
        ),
        "cogvideox-i2v/image-to-video": (
            "tiny-cogvideox-i2v",
            [{"id": "i", "prompt": "the fox turns", "image": inputs["cond.png"], "seed": 5}],
            {},
        ),
        "cogvideox-fun/control-to-video": (
            "tiny-cogvideox-fun",
            [{"id": "c", "prompt": "a dancer", "video": inputs["clip9.mp4"], "seed": 6}],
            {},
        ),
        "glm-image/text-to-image": ("tiny-glm-image", text, {}),
        "glm-image/image-to-image": (
            "tiny-glm-image",
            [{"id": "i", "prompt": "the same, at night", "image": inputs["cond.png"], "seed": 7}],
            {},
        ),
    }


def render_case(tmp_path: Path, name: str, model: str, rows: list[dict], options: dict) -> dict:
    from tests.inprocess import render_in_process

    out = tmp_path / name.replace("/", "_")
    decoded = render_in_process(rows, model, out, threads=1, **options)
    hashes = {}
    for path in sorted((out / "outputs").rglob("*")):
        if path.is_file():
            row_id = next(i for i in decoded if path.stem.startswith(i))
            hashes[row_id] = {
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "pixels": hashlib.sha256(np.ascontiguousarray(decoded[row_id]).tobytes()).hexdigest(),
            }
    return hashes


def machine() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(cases({k: "" for k in ("cond.png", "clip9.mp4", "clip13.mp4")})))
def test_outputs_are_the_recorded_ones(tmp_path, golden, name):
    model, rows, options = cases(_inputs(tmp_path / "inputs"))[name]
    assert render_case(tmp_path, name, model, rows, options) == golden["outputs"][name], (
        f"{name} renders other outputs than recorded on {golden['recorded_on']}"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_golden_outputs --write")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        recorded = {
            name: render_case(tmp, name, *case) for name, case in cases(_inputs(tmp / "inputs")).items()
        }
    GOLDEN.write_text(json.dumps({"recorded_on": machine(), "outputs": recorded}, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {sum(map(len, recorded.values()))} outputs of {len(recorded)} cases")
