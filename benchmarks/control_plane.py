"""Control plane: the rows/s one driver sustains, and its CPU per row, when workers cost nothing.

    python -m benchmarks.control_plane [--rows 20000] [--replicas 16,32,64]
        [--datasets files,webdataset,parquet] [--rounds 1] [--batch-size 1] [--profile DIR]

The real driver (`cogdist.engine.run`: scheduler, replica loop, sink and index commits) drives N
replicas of `InstantWorker`, a stand-in that renders nothing and answers each unit at once (as
vLLM benchmarks its engine with dummy weights): this measures the driver, never rendering. The
stand-in mimics RenderWorker's interface (constructor, `setup`, `render`) without importing
torch or diffusers, so 64 of its actors fit on a small machine; each replica reserves the
logical CPU share the embedded instance gives it (`replica_layout`), not a real core. In the
dataset modes it returns a small valid PNG per row, as a real worker returns its encoded output
when the sink stores it (`returns_outputs`); in files mode it writes nothing (the driver only
indexes the path the worker reports).

Ray is started once, before any run, and every run joins it, so Ray's start is excluded. The
driver's CPU is the process's CPU time (`time.process_time()`: every thread, Ray's own
included), read every SAMPLE_ROWS rows; the steady state starts once every replica is
ready. Reported per (replicas, dataset): rows/s and driver CPU ms per row over the steady state,
and over its first and last fifth of rows (flat in the rows already done when they agree).
`--profile DIR` also writes a cProfile of each run's driver thread in its steady state there.
Results go to benchmarks/results/control_plane.json.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import logging
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from cogdist.work import ItemResult, UnitResult, WorkUnit

MODEL = "tiny-cogview4"
PARTS = 5
"""The steady state is cut into this many parts of equal rows: the first and last are compared."""
SAMPLE_ROWS = 20
"""The driver's CPU time is read after the first unit that ends this many rows after the last
reading (a reading of a process's CPU time costs tens of microseconds when Ray's threads run)."""


class StandInInfo(NamedTuple):
    """What the loop reads of a worker's setup (RenderWorker returns a WorkerInfo)."""

    device: str
    attention_backend: str


def tiny_png(width: int, height: int) -> bytes:
    """A valid black RGB PNG: small encoded bytes, made without Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    scanlines = (b"\x00" + bytes(3 * width)) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines))
        + chunk(b"IEND", b"")
    )


def instant_worker(replicas: int, meeting: Path) -> type:
    """The stand-in worker class of a run of `replicas` replicas. Its setup returns once every
    replica has reached it (each leaves a file in `meeting`; the wait is bounded), so that the
    steady state has them all: otherwise the quickest would render every row while the last
    were still starting."""

    class InstantWorker:
        """RenderWorker's interface, rendering nothing: every row of a unit is done at once."""

        def __init__(self, spec, out_uri: str, settings, rank: int = 0, world_size: int = 1):
            self.settings = settings
            self.rank = rank
            self.node = ""
            self.outputs: dict[tuple[int, int], tuple[bytes, str]] = {}

        def rendezvous(self) -> tuple[str, int]:
            return ("127.0.0.1", 0)

        def setup(self, address: tuple[str, int] | None = None) -> StandInInfo:
            import os

            import ray

            self.node = ray.get_runtime_context().get_node_id()
            (meeting / f"ready-{os.getpid()}").touch()
            deadline = time.monotonic() + 600
            while len(list(meeting.glob("ready-*"))) < replicas and time.monotonic() < deadline:
                time.sleep(0.1)
            return StandInInfo("cpu", self.settings.attention_backend)

        def render(self, unit: WorkUnit) -> UnitResult:
            start = time.perf_counter()
            results = []
            for item in unit.items:
                size = (item.width, item.height)
                if size not in self.outputs:
                    data = tiny_png(*size)
                    self.outputs[size] = (data, hashlib.sha256(data).hexdigest())
                data, digest = self.outputs[size]
                returned = data if self.settings.return_outputs else None
                results.append(
                    ItemResult(
                        item.id,
                        ok=True,
                        bytes_written=len(data),
                        sha256=digest,
                        node=self.node,
                        data=returned,
                    )
                )
            return UnitResult(unit.unit_id, tuple(results), time.perf_counter() - start)

    return InstantWorker


def make_manifest(path: Path, rows: int, size: int) -> None:
    pq.write_table(
        pa.table(
            {
                "id": [f"row-{i:07d}" for i in range(rows)],
                "prompt": [f"benchmark scene {i}, a small house by a lake" for i in range(rows)],
                "seed": list(range(rows)),
                "width": [size] * rows,
                "height": [size] * rows,
                "num_inference_steps": [2] * rows,
            }
        ),
        path,
    )


def available_gib() -> float:
    """MemAvailable of /proc/meminfo (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 2**20


class Sample(NamedTuple):
    done: int
    cpu: float
    """time.process_time() of the driver."""
    wall: float
    all_ready: bool


def probed_run(
    options, worker_class: type, profile: Path | None
) -> tuple[object, list[Sample], float, float]:
    """engine.run with the stand-in, sampling the driver's CPU every SAMPLE_ROWS rows (and
    profiling its steady state into `profile`); returns the summary, the samples, the run's
    whole driver CPU seconds and MemAvailable once every replica is ready."""
    from cogdist import engine
    from cogdist.engine.loop import RenderLoop
    from cogdist.patching import replaced

    samples: list[Sample] = []
    record = RenderLoop._record
    ready = [False]
    memory = [0.0]
    # The driver thread's own CPU time, not wall time: on a loaded machine the two differ.
    profiler = cProfile.Profile(time.thread_time) if profile else None
    next_sample = [0]

    def probe(self, finished, failed, replica=None):
        record(self, finished, failed, replica)
        if not finished or self.done < next_sample[0]:
            return
        if not ready[0]:
            ready[0] = all(r.ready for r in self.replicas)
            if ready[0]:
                memory[0] = available_gib()
                if profiler:
                    profiler.enable()
        samples.append(Sample(self.done, time.process_time(), time.perf_counter(), ready[0]))
        next_sample[0] = self.done + SAMPLE_ROWS

    cpu = time.process_time()
    with replaced(RenderLoop, "_record", probe):
        summary = engine.run(options, worker_class=worker_class)
    if profiler:
        profiler.disable()
        profiler.dump_stats(str(profile))
    return summary, samples, time.process_time() - cpu, memory[0]


def per_row(samples: list[Sample]) -> dict:
    rows = samples[-1].done - samples[0].done
    cpu = samples[-1].cpu - samples[0].cpu
    wall = samples[-1].wall - samples[0].wall
    return {
        "rows": rows,
        "seconds": round(wall, 2),
        "rows_per_second": round(rows / wall, 1) if wall else None,
        "driver_cpu_ms_per_row": round(1000 * cpu / rows, 3) if rows else None,
    }


def steady_figures(samples: list[Sample]) -> dict:
    """Rows/s and driver CPU per row once every replica is ready, whole and per fifth of rows."""
    steady = [s for s in samples if s.all_ready]
    if len(steady) < 2 * PARTS:
        return {"steady": None}
    first, last = steady[0].done, steady[-1].done
    bounds = [first + (last - first) * k // PARTS for k in range(PARTS + 1)]
    cuts = [next(i for i, s in enumerate(steady) if s.done >= b) for b in bounds]
    parts = [per_row(steady[a : b + 1]) for a, b in zip(cuts, cuts[1:])]
    return {
        "steady": per_row(steady),
        "first_part": parts[0],
        "last_part": parts[-1],
        "parts_cpu_ms_per_row": [p["driver_cpu_ms_per_row"] for p in parts],
        "parts_rows_per_second": [p["rows_per_second"] for p in parts],
    }


def run_one(
    manifest: Path,
    out: Path,
    replicas: int,
    dataset: str,
    batch_size: int,
    profile: Path | None,
    idle_gib: float,
):
    from cogdist.options import RenderOptions

    options = RenderOptions(
        manifest=str(manifest),
        model=MODEL,
        out=str(out),
        replicas=replicas,
        device="cpu",
        dataset=dataset,
        batch_size=batch_size,
        progress=False,
    )
    meeting = out.with_name(out.name + "-meeting")
    meeting.mkdir()
    summary, samples, cpu, available = probed_run(options, instant_worker(replicas, meeting), profile)
    assert summary.ok and summary.done == summary.total, summary
    all_ready = next((s for s in samples if s.all_ready), None)
    return {
        "replicas": replicas,
        "dataset": dataset,
        "rows": summary.done,
        "wall_seconds": round(summary.seconds, 2),
        "startup_seconds": round(summary.startup_seconds, 2),
        "all_ready_after_rows": all_ready.done if all_ready else None,
        # Ray, its replicas and the driver: the machine's MemAvailable before Ray less that now.
        "memory_in_use_gib": round(idle_gib - available, 2),
        "whole_run_driver_cpu_ms_per_row": round(1000 * cpu / summary.done, 3),
        **steady_figures(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64, help="rows' width and height")
    parser.add_argument("--replicas", default="16,32,64", help="comma-separated replica counts")
    parser.add_argument("--datasets", default="files,webdataset,parquet")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--profile", type=Path, help="write a cProfile of each run's driver here")
    parser.add_argument("--name", default="control_plane", help="results file name")
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    datasets = args.datasets.split(",")

    import sys

    import ray

    from benchmarks.common import save

    if __name__ != "__main__":  # the actors get the stand-in by value, not by importing benchmarks
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    idle_gib = available_gib()
    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(counts), include_dashboard=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - start
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_manifest(work / "m.parquet", args.rows, args.size)
        for round_ in range(args.rounds):
            for n in counts:
                for dataset in datasets:
                    name = f"replicas={n} {dataset}"
                    profile = args.profile / f"{n}-{dataset}-{round_}.prof" if args.profile else None
                    if profile:
                        profile.parent.mkdir(parents=True, exist_ok=True)
                    out = work / f"out-{n}-{dataset}-{round_}"
                    result = run_one(work / "m.parquet", out, n, dataset, args.batch_size, profile, idle_gib)
                    runs.setdefault(name, []).append(result)
                    print(f"round {round_}: {name}: {result}", flush=True)
    ray.shutdown()

    medians = {}
    for name, results in runs.items():
        done = [r for r in results if r.get("steady")]
        if not done:
            continue
        medians[name] = {
            key: statistics.median(r[part][field] for r in done)
            for key, part, field in (
                ("rows_per_second", "steady", "rows_per_second"),
                ("driver_cpu_ms_per_row", "steady", "driver_cpu_ms_per_row"),
                ("first_part_cpu_ms_per_row", "first_part", "driver_cpu_ms_per_row"),
                ("last_part_cpu_ms_per_row", "last_part", "driver_cpu_ms_per_row"),
            )
        }
        print(f"{name}: {medians[name]}")
    result = {
        "rows": args.rows,
        "size": args.size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "ray_start_seconds_excluded": round(ray_start, 2),
        "runs": runs,
        "medians": medians,
        "goal": "<= 1 ms of driver CPU per row, flat in rows done and in replicas",
    }
    print(f"saved {save(args.name, result)}")


if __name__ == "__main__":
    main()
