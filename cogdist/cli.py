"""`cogdist` command line: render, validate, status, report, models. A thin layer over cogdist.api."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import asdict

from cogdist._version import __version__
from cogdist.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING, EXIT_ROWS_FAILED, CogdistError
from cogdist.sink.dataset import DATASETS, DEFAULT_SHARD_SIZE, FILES
from cogdist.storage import RETRY_SECONDS
from cogdist.worker.cache import CACHE_KINDS, FIRST_BLOCK_THRESHOLD, NO_CACHE
from cogdist.worker.checkpoint import CHECKPOINT_SECONDS

EPILOG = """exit codes: 0 every row is in the index; 1 some rows failed (recorded under OUT/failures)
or the run stopped; 2 refused before rendering (bad manifest, options or conflicting resume);
130 interrupted."""


def _add_model_defaults(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("defaults for rows that leave a column empty")
    group.add_argument("--width", type=int, help="default width (model's default otherwise)")
    group.add_argument("--height", type=int, help="default height")
    group.add_argument("--steps", type=int, help="default num_inference_steps")
    group.add_argument("--guidance", type=float, help="default guidance_scale")
    group.add_argument("--frames", type=int, help="default num_frames (video models)")
    group.add_argument("--fps", type=float, help="default frames per second of the MP4s (video models)")


def _add_trust_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "checkpoints you trust (off: safetensors only, no code from the checkpoint)"
    )
    group.add_argument(
        "--allow-pickle-weights",
        action="store_true",
        help="load .bin/.pt pickle weights (can run code when loaded; only for checkpoints you trust)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let diffusers import Python code that ships with the checkpoint (only for code you trust)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogdist",
        description="Render batches of CogView4 / CogVideoX / GLM-Image outputs across GPUs with Ray.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"cogdist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser(
        "render", help="render a manifest (re-run the same command to resume)", epilog=EPILOG
    )
    render.add_argument("manifest", help="Parquet file, folder or glob; local path or s3:// / gs:// URI")
    render.add_argument(
        "--model", required=True, help="preset (see `cogdist models`), HF repo id or local folder"
    )
    render.add_argument("--out", required=True, help="output folder or s3:// / gs:// prefix")
    render.add_argument(
        "--replicas", type=int, help="gangs in parallel (default: one per GPU, 2 without GPUs)"
    )
    render.add_argument(
        "--sp", type=int, default=1, help="sequence-parallel degree: GPUs sharing one sample (default 1)"
    )
    render.add_argument(
        "--collective-timeout",
        type=float,
        default=600.0,
        help="seconds a gang member waits for a peer before the gang is rebuilt (default 600)",
    )
    render.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="conditional and unconditional passes on two halves of the gang: 2 x --sp GPUs per gang",
    )
    render.add_argument(
        "--batch-size", type=int, default=1, help="rows of one shape per pipeline call (default 1)"
    )
    render.add_argument("--max-in-flight", type=int, default=2, help="units queued per replica (default 2)")
    render.add_argument("--max-retries", type=int, default=2, help="retries of a failing row (default 2)")
    render.add_argument(
        "--max-gang-restarts",
        type=int,
        default=3,
        help="times a replica whose workers died is rebuilt before it is given up (default 3)",
    )
    render.add_argument(
        "--format",
        choices=["png", "jpeg", "webp", "mp4"],
        help="output format (default: png; mp4 for videos)",
    )
    render.add_argument(
        "--quality",
        type=int,
        help="1..100: JPEG/WebP quality (default 95); MP4 quality (default 65 = CRF 18)",
    )
    render.add_argument(
        "--save-frames", action="store_true", help="video models: also write every frame as a PNG"
    )
    render.add_argument(
        "--dataset",
        choices=DATASETS,
        default=FILES,
        help="files: one file per row under outputs/ (default); webdataset: tar shards under shards/; "
        "parquet: Hugging Face datasets Parquet with the media embedded, under data/",
    )
    render.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"samples per shard with --dataset webdataset/parquet (default {DEFAULT_SHARD_SIZE})",
    )
    memory = render.add_argument_group("memory (default: the model's; see `cogdist models`)")
    memory.add_argument(
        "--vae-tiling", action=argparse.BooleanOptionalAction, help="decode in overlapping tiles"
    )
    memory.add_argument(
        "--vae-slicing", action=argparse.BooleanOptionalAction, help="decode a batch one sample at a time"
    )
    memory.add_argument(
        "--cpu-offload",
        action=argparse.BooleanOptionalAction,
        help="GPU: keep only the running component on the GPU (model CPU offload)",
    )
    render.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"
    )
    render.add_argument(
        "--cache",
        choices=CACHE_KINDS,
        default=NO_CACHE,
        help="step cache on the transformer: reuse work between denoising steps (faster, pixels differ "
        "slightly; default none). CogView4: first-block, taylorseer; CogVideoX: also pab",
    )
    render.add_argument(
        "--cache-threshold",
        type=float,
        metavar="T",
        help=f"--cache first-block: skip the other blocks while the first block's output changed by "
        f"less than T (relative; default {FIRST_BLOCK_THRESHOLD}); higher skips more",
    )
    render.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)"
    )
    render.add_argument("--cpus-per-worker", type=float, help="logical CPUs reserved per worker")
    render.add_argument(
        "--overwrite", action="store_true", help="start over: remove what an earlier job wrote to OUT"
    )
    render.add_argument(
        "--retry-failed", action="store_true", help="render rows recorded under failures/ again"
    )
    render.add_argument(
        "--storage-timeout",
        type=float,
        default=RETRY_SECONDS,
        help=f"seconds reads and writes of OUT are retried before the run stops (default {RETRY_SECONDS:.0f})",
    )
    render.add_argument(
        "--commit-interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between index commits: each commit writes the rows finished since the last one "
        "as one Parquet part (default 2)",
    )
    render.add_argument(
        "--step-checkpoint",
        type=int,
        metavar="N",
        help="video models: save the denoising state every N steps so a killed item resumes mid-way "
        f"(default: every {CHECKPOINT_SECONDS:.0f}s of an item's denoising; 0: never)",
    )
    render.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_defaults(render)
    _add_trust_options(render)

    validate = commands.add_parser("validate", help="check a manifest against a model without rendering")
    validate.add_argument("manifest")
    validate.add_argument("--model", required=True)
    _add_model_defaults(validate)
    _add_trust_options(validate)

    status = commands.add_parser("status", help="done / failed (and pending, given the manifest) of an OUT")
    status.add_argument("out")
    status.add_argument("--manifest", help="count pending rows of this manifest too")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 0 only when the job is complete: 3 when manifest rows are pending, 1 when rows failed",
    )

    report = commands.add_parser(
        "report", help="an HTML page and a PNG of a job: throughput, replicas, failures, samples"
    )
    report.add_argument("out", help="the job's OUT (local path or s3:// / gs:// URI)")
    report.add_argument("--html", help="where to write the page (default OUT/report.html)")
    report.add_argument("--png", help="where to write the PNG (default OUT/report.png)")
    report.add_argument(
        "--samples", type=int, default=24, help="outputs shown on the contact sheet (default 24)"
    )

    models = commands.add_parser("models", help="list the model presets")
    models.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _render(args: argparse.Namespace) -> int:
    from cogdist.api import render

    summary = render(
        args.manifest,
        model=args.model,
        out=args.out,
        replicas=args.replicas,
        sp=args.sp,
        cfg_parallel=args.cfg_parallel,
        collective_timeout=args.collective_timeout,
        storage_timeout=args.storage_timeout,
        commit_interval=args.commit_interval,
        step_checkpoint=args.step_checkpoint,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        max_retries=args.max_retries,
        max_gang_restarts=args.max_gang_restarts,
        format=args.format,
        quality=args.quality,
        dtype=args.dtype,
        cache=args.cache,
        cache_threshold=args.cache_threshold,
        address=args.address,
        cpus_per_worker=args.cpus_per_worker,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        frames=args.frames,
        fps=args.fps,
        save_frames=args.save_frames,
        dataset=args.dataset,
        shard_size=args.shard_size,
        vae_tiling=args.vae_tiling,
        vae_slicing=args.vae_slicing,
        cpu_offload=args.cpu_offload,
        allow_pickle=args.allow_pickle_weights,
        trust_remote_code=args.trust_remote_code,
    )
    print(summary.describe())
    return summary.exit_code


def _validate(args: argparse.Namespace) -> int:
    from cogdist.api import validate

    report = validate(
        args.manifest,
        model=args.model,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        frames=args.frames,
        fps=args.fps,
        allow_pickle=args.allow_pickle_weights,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"ok: {report.rows} rows in {report.files} file(s) can be rendered with {args.model}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from cogdist.api import status

    result = status(args.out, args.manifest)
    code = _status_exit_code(result) if args.check else EXIT_OK
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return code
    print(f"{result.out}: model {result.model}")
    print(f"  done     {result.done}")
    print(f"  failed   {result.failed}")
    if result.pending is not None:
        print(f"  pending  {result.pending}")
    for item_id, error, attempts in result.failures:
        print(f"  failed {item_id!r} after {attempts} attempt(s): {error.splitlines()[0][:200]}")
    return code


def _status_exit_code(result) -> int:
    # Pending before failed: the next step is then to resume the render, which finishes the
    # rest; failed rows are the question once nothing is pending. No --manifest: pending unknown.
    if result.pending:
        return EXIT_PENDING
    if result.failed:
        return EXIT_ROWS_FAILED
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from cogdist.api import report

    files = report(args.out, html=args.html, png=args.png, samples=args.samples)
    print(f"report of {files.done} done and {files.failed} failed rows")
    if files.done == 0:
        print("  no row has finished yet: the report shows the failures alone")
    print(f"  page  {files.html}")
    print(f"  png   {files.png}")
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from cogdist.api import models

    specs = models()
    if args.json:
        print(json.dumps([{**asdict(s), "conditioning": sorted(s.conditioning)} for s in specs], indent=2))
        return EXIT_OK
    print(f"{'MODEL':<40} {'TASKS':<34} {'DEFAULT':<28} SIZES")
    for s in specs:
        default = f"{s.width}x{s.height} {s.num_inference_steps} steps"
        if s.kind == "video":
            default += f" {s.num_frames}f@{s.fps:g}fps"
        print(f"{s.name:<40} {', '.join(s.tasks):<34} {default:<28} {s.sizes.describe()}")
        notes = [s.description]
        if s.frames:
            notes.append(f"frames: {s.frames.describe()}")
        memory = [name for name, on in (("vae tiling", s.vae_tiling), ("vae slicing", s.vae_slicing)) if on]
        if memory:
            notes.append(f"default memory options: {', '.join(memory)}")
        print(f"    {'; '.join(notes)}")
    print(
        "\nAlso accepted: any Hugging Face repo id of these pipelines, or a local folder with model_index.json."
    )
    return EXIT_OK


def _terminate(signum: int, frame: object) -> None:
    # `ray job stop` and Kubernetes send SIGTERM: unwind so that finished rows are committed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _terminate)
    handlers = {
        "render": _render,
        "validate": _validate,
        "status": _status,
        "report": _report,
        "models": _models,
    }
    try:
        return handlers[args.command](args)
    except CogdistError as e:
        print(f"cogdist: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "cogdist: interrupted; finished rows are committed, re-run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
