"""Every tiny family on the CPU: items/s and framework overhead against a plain diffusers loop.

    python -m benchmarks.families [--rows 24] [--rounds 2] [--only tiny-cogvideox-i2v ...]

For each task of each tiny preset, the same rows are rendered (a) by the stock diffusers
pipeline called row by row in one process with `generator=torch.Generator("cpu").manual_seed(seed)`,
writing the same files (MP4 through imageio-ffmpeg, or PNG), and (b) by `cogdist.render` with one
replica on an embedded Ray instance. cogdist's steady state (first replica ready -> last index
commit) is compared with the loop; Ray start and model load are reported apart. Rounds are
interleaved and medians compared, as the 2-core machine is noisy. Results go to
benchmarks/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import cogdist
from benchmarks.common import RESULTS, save, set_up_worker
from cogdist.sink.encode import encode_image, encode_video
from cogdist.worker.inputs import load_image, load_video

# (preset, task, input column or None)
CASES = [
    ("tiny-cogvideox", "text-to-video", None),
    ("tiny-cogvideox", "video-to-video", "video"),
    ("tiny-cogvideox1.5", "text-to-video", None),
    ("tiny-cogvideox-i2v", "image-to-video", "image"),
    ("tiny-cogvideox-fun", "control-to-video", "video"),
    ("tiny-glm-image", "text-to-image", None),
    ("tiny-glm-image", "image-to-image", "image"),
]


def make_inputs(folder: Path) -> dict[str, str]:
    x = np.linspace(0, 200, 64)[None, :, None]
    clip = np.stack([np.broadcast_to(x + 5 * i, (64, 64, 3)) for i in range(9)]).astype(np.uint8)
    (folder / "clip.mp4").write_bytes(encode_video(clip, fps=8.0))
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    image.save(folder / "cond.png")
    return {"video": str(folder / "clip.mp4"), "image": str(folder / "cond.png")}


def make_rows(count: int, column: str | None, inputs: dict[str, str]) -> list[dict]:
    rows = []
    for i in range(count):
        row = {"id": f"bench-{i:03d}", "prompt": f"benchmark scene {i}, a small house by a lake", "seed": i}
        if column:
            row[column] = inputs[column]
        rows.append(row)
    return rows


def plain_loop(preset: str, task: str, rows: list[dict], out: Path) -> float:
    """The stock pipeline of the task, row by row, writing the same files cogdist writes."""
    worker = set_up_worker(preset)
    spec, pipe = worker.spec, worker.pipe
    # The task's stock pipeline (its family declares the class) over the loaded components, as the
    # runner makes it: the loaded pipeline itself when it is of that class.
    wanted = worker.family.pipelines[task]
    if type(pipe).__name__ != wanted:
        pipe = getattr(diffusers, wanted)(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    for row in rows:
        kwargs = dict(
            prompt=row["prompt"],
            height=spec.height,
            width=spec.width,
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(row["seed"]),
            output_type="np",
        )
        if task == "video-to-video":
            kwargs.update(video=load_video(row["video"], spec.num_frames), strength=0.8)
        elif task == "control-to-video":
            kwargs.update(control_video=load_video(row["video"], spec.num_frames))
        elif task in ("text-to-video", "image-to-video"):
            kwargs.update(num_frames=spec.num_frames)
        if task in ("image-to-video", "image-to-image"):
            image = load_image(row["image"])
            kwargs.update(image=image if task == "image-to-video" else [image])
        result = pipe(**kwargs)
        if spec.kind == "video":
            frames = (result.frames[0] * 255).round().astype(np.uint8)
            (out / f"{row['id']}.mp4").write_bytes(encode_video(frames, spec.fps))
        else:
            pixels = (result.images[0] * 255).round().astype(np.uint8)
            (out / f"{row['id']}.png").write_bytes(encode_image(pixels, "png"))
    return time.perf_counter() - start


def cogdist_run(preset: str, manifest: Path, out: Path) -> dict:
    summary = cogdist.render(str(manifest), model=preset, out=str(out), replicas=1, progress=False)
    assert summary.ok, summary
    # render_seconds: the worker's time per row from receiving its unit to writing it (input reads
    # and encoding included): their sum over the steady time is the worker's busy fraction.
    busy = float(pq.read_table(out / "index", columns=["render_seconds"])["render_seconds"].to_numpy().sum())
    return {
        "worker_busy_seconds": round(busy, 2),
        "busy_fraction": round(busy / summary.steady_seconds, 3),
        "wall_seconds": round(summary.seconds, 2),
        "startup_seconds": round(summary.startup_seconds, 2),
        "steady_seconds": round(summary.steady_seconds, 2),
        "items_per_second": round(summary.done / summary.steady_seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="presets to run (default: all)")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = make_inputs(work)
        for preset, task, column in CASES:
            if args.only and preset not in args.only:
                continue
            rows = make_rows(args.rows, column, inputs)
            manifest = work / f"{preset}-{task}.parquet"
            pq.write_table(pa.Table.from_pylist(rows), manifest)
            loops, runs = [], []
            for round_ in range(args.rounds):
                loops.append(
                    round(plain_loop(preset, task, rows, work / f"loop-{preset}-{task}-{round_}"), 2)
                )
                runs.append(cogdist_run(preset, manifest, work / f"cogdist-{preset}-{task}-{round_}"))
                print(f"{preset} {task} round {round_}: loop {loops[-1]}s, cogdist {runs[-1]}", flush=True)
            loop = statistics.median(loops)
            steady = statistics.median(r["steady_seconds"] for r in runs)
            results.append(
                {
                    "preset": preset,
                    "task": task,
                    "rows": args.rows,
                    "loop_seconds": loops,
                    "cogdist": runs,
                    "loop_items_per_second": round(args.rows / loop, 3),
                    "cogdist_items_per_second": round(args.rows / steady, 3),
                    "overhead_ratio": round(steady / loop, 3),
                }
            )
            print(f"{preset} {task}: overhead {results[-1]['overhead_ratio']}x", flush=True)
    if args.only:  # keep the other presets' last figures
        previous = RESULTS / "families.json"
        if previous.exists():
            done = {(r["preset"], r["task"]) for r in results}
            kept = [
                r for r in json.loads(previous.read_text())["results"] if (r["preset"], r["task"]) not in done
            ]
            results = kept + results
    print(f"saved {save('families', {'rounds': args.rounds, 'rows': args.rows, 'results': results})}")


if __name__ == "__main__":
    main()
