"""Every tiny preset and task renders what it rendered when the goldens were recorded.

`tests/data/golden_outputs.json` holds, per machine (CPU model and library versions), the sha256
of every output of a fixed manifest per tiny preset and task (the file's bytes, as the index
records them, and its decoded pixels), first recorded before the structure of cogdist changed;
`tests/data/golden_pixels.npz` holds the decoded pixels themselves. On a recorded machine a
refactoring that changes one pixel fails here. Float kernels differ between CPU generations
(AVX-512 against AVX2 or plain kernels: up to 1/255 on images and a mean of 1.4/255 on videos,
whose H.264 encoding amplifies a rounding step into up to 40/255 in a few pixels, measured with
ATEN_CPU_CAPABILITY=default and ONEDNN_MAX_CPU_ISA=SSE41 on one machine), so on every machine the
pixels must also lie within TOLERANCE of the recorded ones: a change of seed, scheduler, task or
guidance moves them by tens of levels on average.

`python -m tests.test_golden_outputs --add-machine` records this machine's hashes beside the
others (its pixels must be within the tolerance); `--write` starts over from this machine, only
for a change that is meant to change pixels.
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
PIXELS = Path(__file__).parent / "data" / "golden_pixels.npz"
TOLERANCE = {"mean": 3.0, "max": 64}
"""Of |rendered - recorded| in levels of 255, per output: twice the kernel differences measured."""


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
    """row id -> {sha256 of the stored file, sha256 of its decoded pixels, the pixels}."""
    from tests.inprocess import render_in_process

    out = tmp_path / name.replace("/", "_")
    decoded = render_in_process(rows, model, out, threads=1, **options)
    rendered = {}
    for path in sorted((out / "outputs").rglob("*")):
        if path.is_file():
            row_id = next(i for i in decoded if path.stem.startswith(i))
            pixels = np.ascontiguousarray(decoded[row_id])
            rendered[row_id] = {
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "pixels": hashlib.sha256(pixels.tobytes()).hexdigest(),
                "decoded": pixels,
            }
    return rendered


def hashes(rendered: dict) -> dict:
    return {
        row_id: {k: v for k, v in output.items() if k != "decoded"} for row_id, output in rendered.items()
    }


def far_from(rendered: dict, recorded, name: str) -> list[str]:
    """The outputs of `name` whose pixels lie outside TOLERANCE of the `recorded` ones."""
    problems = []
    for row_id, output in rendered.items():
        key = f"{name}|{row_id}"
        if key not in recorded.files:
            problems.append(f"{key}: no recorded pixels")
            continue
        expected = recorded[key]
        if expected.shape != output["decoded"].shape:
            problems.append(f"{key}: shape {output['decoded'].shape}, recorded {expected.shape}")
            continue
        difference = np.abs(output["decoded"].astype(int) - expected.astype(int))
        if difference.mean() > TOLERANCE["mean"] or difference.max() > TOLERANCE["max"]:
            problems.append(f"{key}: mean |difference| {difference.mean():.2f}, max {difference.max()}")
    return problems


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
        # Two CPUs of one name ("AMD EPYC") may run other kernels (AVX2 or AVX-512): other bytes.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def this_machine(golden: dict) -> dict | None:
    """This machine's record, if it has one."""
    return next((m for m in golden["machines"] if m["recorded_on"] == machine()), None)


@pytest.mark.parametrize("name", sorted(cases({k: "" for k in ("cond.png", "clip9.mp4", "clip13.mp4")})))
def test_outputs_are_the_recorded_ones(tmp_path, golden, name):
    model, rows, options = cases(_inputs(tmp_path / "inputs"))[name]
    rendered = render_case(tmp_path, name, model, rows, options)
    with np.load(PIXELS) as recorded:
        assert not far_from(rendered, recorded, name), far_from(rendered, recorded, name)
    record = this_machine(golden)
    if record is not None:  # exact, where the kernels are the recorded ones
        assert hashes(rendered) == record["outputs"][name], (
            f"{name} renders other outputs than recorded on {record['recorded_on']}"
        )


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--add-machine"]):
        sys.exit("usage: python -m tests.test_golden_outputs --write | --add-machine")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        rendered = {
            name: render_case(tmp, name, *case) for name, case in cases(_inputs(tmp / "inputs")).items()
        }
    record = {"recorded_on": machine(), "outputs": {name: hashes(r) for name, r in rendered.items()}}
    if sys.argv[1] == "--write":
        machines = [record]
        pixels = {f"{name}|{row_id}": o["decoded"] for name, r in rendered.items() for row_id, o in r.items()}
        np.savez_compressed(PIXELS, **pixels)
    else:
        with np.load(PIXELS) as recorded:
            far = [problem for name, r in rendered.items() for problem in far_from(r, recorded, name)]
        if far:
            sys.exit(
                "this machine's pixels are not within the tolerance of the recorded ones:\n" + "\n".join(far)
            )
        machines = [m for m in json.loads(GOLDEN.read_text())["machines"] if m["recorded_on"] != machine()]
        machines.append(record)
    GOLDEN.write_text(json.dumps({"machines": machines}, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {len(machines)} machine(s), {sum(map(len, rendered.values()))} outputs")
