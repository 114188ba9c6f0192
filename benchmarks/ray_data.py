"""Ray Data's own batch-inference path as a peer: wall time, resume after a kill, peak memory.

    python -m benchmarks.ray_data [--rows 48] [--size 512] [--steps 6] [--replicas 2] [--rounds 3]

The same `tiny-cogview4` rows are rendered two ways, each in a fresh driver process:

- cogdist: `cogdist.render(..., replicas=R)` (the CLI, `python -m cogdist render`, for the kill);
- Ray Data: `read_parquet(manifest).repartition(...).map_batches(RenderRows,
  compute=ActorPoolStrategy(size=R), num_cpus=cores/R, batch_size=B).write_parquet(out/results)`,
  where `RenderRows` holds the pipeline cogdist builds for `tiny-cogview4`
  (a `RenderWorker` set up in the actor with torch threads = its CPUs, as cogdist's worker sets
  them: its `pipe`), calls it once per row with `generator=torch.Generator("cpu").manual_seed(seed)` and writes
  the PNG with cogdist's encoder. Resume uses Ray Data's built-in checkpointing
  (`DataContext.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=...)`, beta
  in Ray 2.60): committed ids are recorded per written block and filtered out of the read when the
  same program runs again. Its Ray instance gets 2 logical CPUs more than the cores: Ray Data's
  list-files task and, on a resume, its checkpoint filter's actor need CPUs beside the actors.

Per round: one full run of each (total wall time of the driver process, and the steady time from
the first ready worker to the end of the last write), then one run of each killed with SIGKILL
once half the PNGs are on disk, followed by the same command again (the resume, timed as a
whole). Peak memory is the largest sum, over the samples taken every 0.5 s, of the memory of the
driver and every process of its session (Ray's daemons and workers): RSS, and PSS, which counts
the shared object store once instead of once per process that maps it.
Results go to benchmarks/results/ray_data.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.dataset as ds
from PIL import Image

from benchmarks.common import save
from benchmarks.overhead import make_manifest

ROOT = Path(__file__).resolve().parents[1]


class RenderRows:
    """Ray Data callable class: one tiny CogView4 pipeline per actor, one pipeline call per row."""

    def __init__(self, out: str, threads: int, run: str):
        import torch

        from cogdist.models.registry import resolve_model
        from cogdist.worker.settings import WorkerSettings
        from cogdist.worker.worker import RenderWorker

        torch.set_num_threads(threads)
        # The stock CogView4Pipeline, as a worker builds it (this actor's code is pickled by value:
        # it imports cogdist only, not the benchmarks package).
        worker = RenderWorker(resolve_model("tiny-cogview4"), out, WorkerSettings(threads=threads))
        worker.setup()
        self.pipe = worker.pipe
        self.images = Path(out) / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.run = run
        self.ready_at = time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cogdist.sink.encode import encode_image

        paths, seconds, finished = [], [], []
        for i, row_id in enumerate(batch["id"]):
            start = time.perf_counter()
            image = self.pipe(
                str(batch["prompt"][i]),
                height=int(batch["height"][i]),
                width=int(batch["width"][i]),
                num_inference_steps=int(batch["num_inference_steps"][i]),
                guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(int(batch["seed"][i])),
            ).images[0]
            path = self.images / f"{row_id}.png"
            # Written under a temporary name first, so a kill never leaves a truncated PNG.
            partial = path.with_suffix(".png.partial")
            partial.write_bytes(encode_image(np.asarray(image), "png"))
            partial.rename(path)
            paths.append(str(path))
            seconds.append(time.perf_counter() - start)
            finished.append(time.time())
        n = len(paths)
        return {
            "id": batch["id"],
            "seed": batch["seed"],
            "path": np.array(paths),
            "render_seconds": np.array(seconds),
            "finished_at": np.array(finished),
            "actor_ready_at": np.full(n, self.ready_at),
            "actor_pid": np.full(n, os.getpid()),
            "run": np.array([self.run] * n),
        }


def ray_data_driver(manifest: str, out: str, replicas: int, batch_size: int, run: str) -> None:
    """The Ray Data program (run in its own process): render every row not yet checkpointed."""
    import logging

    import ray
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    started = time.time()
    cores = os.cpu_count() or 1
    # Ray Data's own operators need CPU slots beside the actors: with the actors holding every
    # logical CPU the pipeline never starts (seen: ListFiles waiting for a CPU forever), and on a
    # resume the checkpoint filter's actor holds one more. Two spare logical CPUs (ListFiles and the
    # filter take one each), and small reservations for the read and write tasks.
    ray.init(address="local", num_cpus=cores + 2, include_dashboard=False, logging_level=logging.WARNING)
    ray_ready = time.time()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Kept after success too, so that running the same program again renders nothing.
    context.checkpoint_config = CheckpointConfig(
        id_column="id", checkpoint_path=f"{out}/checkpoint", delete_checkpoint_on_success=False
    )
    cpus = max(1, cores // replicas)
    (
        ray.data.read_parquet(manifest, num_cpus=0.25)
        # One block per batch, so that the rows are spread over the actors (a one-row-group
        # manifest is read as a single block).
        .repartition(target_num_rows_per_block=batch_size)
        .map_batches(
            RenderRows,
            fn_constructor_kwargs={"out": out, "threads": cpus, "run": run},
            compute=ray.data.ActorPoolStrategy(size=replicas),  # `concurrency=` before Ray 2.51
            batch_size=batch_size,
            num_cpus=cpus,
        )
        .write_parquet(f"{out}/results", ray_remote_args={"num_cpus": 0.25})
    )
    written = time.time()
    ray.shutdown()
    print(json.dumps({"started": started, "ray_ready": ray_ready, "written": written, "ended": time.time()}))


def cogdist_driver(manifest: str, out: str, replicas: int, batch_size: int) -> None:
    """cogdist through its Python API (run in its own process), for the steady-state figures."""
    import cogdist

    summary = cogdist.render(
        manifest, model="tiny-cogview4", out=out, replicas=replicas, batch_size=batch_size, progress=False
    )
    assert summary.ok, summary
    print(
        json.dumps(
            {
                "done": summary.done,
                "ray_start_seconds": summary.ray_start_seconds,
                "startup_seconds": summary.startup_seconds,
                "steady_seconds": summary.steady_seconds,
                "seconds": summary.seconds,
            }
        )
    )


class MemorySampler:
    """Peak of the summed RSS and PSS of a driver and every process of its session."""

    def __init__(self, driver: subprocess.Popen, every: float = 0.5):
        self.driver = driver
        self.sid = os.getsid(driver.pid)
        self.every = every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def processes(self) -> list[psutil.Process]:
        found = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.driver.pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        for p in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                if os.getsid(p.pid) == self.sid:
                    found[p.pid] = p
        return list(found.values())

    def loop(self) -> None:
        while not self.stopped.wait(self.every):
            rss = pss = 0
            processes = self.processes()
            for p in processes:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += info.pss
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(processes))

    def stop(self) -> dict:
        self.stopped.set()
        self.thread.join()
        return {
            "peak_rss_mb": round(self.peak_rss / 2**20),
            "peak_pss_mb": round(self.peak_pss / 2**20),
            "peak_processes": self.peak_processes,
        }


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            if os.getsid(p.pid) == sid:
                found.append(p)
    return found


def run_driver(command: list[str], kill_when=None) -> dict:
    """Run a driver in a session of its own, sampling its memory; SIGKILL it once `kill_when()`."""
    start = time.perf_counter()
    driver = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sid = os.getsid(driver.pid)
    sampler = MemorySampler(driver)
    result: dict = {}
    try:
        if kill_when is None:
            stdout, stderr = driver.communicate(timeout=600)
            assert driver.returncode == 0, stderr[-3000:]
            result["wall_seconds"] = round(time.perf_counter() - start, 2)
            result["output"] = stdout.strip().splitlines()[-1]
        else:
            while not kill_when():
                assert driver.poll() is None, "the driver finished before it could be killed"
                time.sleep(0.2)
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=10)
            result["killed_after_seconds"] = round(time.perf_counter() - start, 2)
            # What the killed driver leaves running, and for how long (up to 30 s).
            killed = time.perf_counter()
            while session_processes(sid) and time.perf_counter() - killed < 30:
                time.sleep(0.5)
            result["leftover_processes_after_30s"] = sorted(p.name() for p in session_processes(sid))
            result["leftovers_gone_after_seconds"] = round(time.perf_counter() - killed, 1)
    finally:
        result.update(sampler.stop())
        for p in session_processes(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    return result


def png_count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png")) if folder.exists() else 0


def read_images(paths: dict[str, str]) -> dict[str, np.ndarray]:
    return {k: np.asarray(Image.open(io.BytesIO(Path(v).read_bytes()))) for k, v in paths.items()}


def result_rows(out: Path) -> list[dict]:
    folder = out / "results"
    if not folder.exists():
        return []
    return ds.dataset(str(folder), format="parquet").to_table(columns=["id", "path", "run"]).to_pylist()


def cogdist_index(out: Path) -> list[dict]:
    return ds.dataset(str(out / "index")).to_table(columns=["id", "uri"]).to_pylist()


def ray_data_steady(out: Path, timings: dict) -> float:
    """First ready actor to the end of the write (the peer of cogdist's first ready replica to the
    last index commit)."""
    table = ds.dataset(str(out / "results"), format="parquet").to_table(columns=["actor_ready_at"])
    return timings["written"] - min(table.column("actor_ready_at").to_pylist())


def one_round(work: Path, round_: int, args: argparse.Namespace) -> dict:
    manifest = str(work / "m.parquet")
    me = [sys.executable, "-m", "benchmarks.ray_data"]  # run_driver runs it from ROOT
    common = ["--replicas", str(args.replicas), "--batch-size", str(args.batch_size)]
    half = args.rows // 2
    results: dict = {}

    # Full runs.
    out = work / f"cogdist-full-{round_}"
    run = run_driver([*me, "--driver", "cogdist", "--manifest", manifest, "--out", str(out), *common])
    summary = json.loads(run.pop("output"))
    run["steady_seconds"] = round(summary["steady_seconds"], 2)
    run["startup_seconds"] = round(summary["startup_seconds"], 2)
    run["items_per_second_steady"] = round(args.rows / summary["steady_seconds"], 3)
    cogdist_images = read_images({r["id"]: r["uri"] for r in cogdist_index(out)})
    assert len(cogdist_images) == args.rows
    results["cogdist_full"] = run
    print(f"round {round_}: cogdist full: {run}", flush=True)

    out = work / f"ray-full-{round_}"
    run = run_driver([*me, "--driver", "ray-data", "--manifest", manifest, "--out", str(out), *common])
    timings = json.loads(run.pop("output"))
    steady = ray_data_steady(out, timings)
    rows = result_rows(out)
    run["steady_seconds"] = round(steady, 2)
    run["startup_seconds"] = round(timings["written"] - steady - timings["started"], 2)
    run["ray_start_seconds"] = round(timings["ray_ready"] - timings["started"], 2)
    run["items_per_second_steady"] = round(args.rows / steady, 3)
    run["result_rows"] = len(rows)
    run["unique_ids"] = len({r["id"] for r in rows})
    ray_images = read_images({r["id"]: r["path"] for r in rows})
    run["identical_to_cogdist"] = sorted(ray_images) == sorted(cogdist_images) and all(
        np.array_equal(ray_images[k], v) for k, v in cogdist_images.items()
    )
    results["ray_data_full"] = run
    print(f"round {round_}: ray data full: {run}", flush=True)

    # Kill half-way (half the PNGs on disk), then the same command again.
    out = work / f"cogdist-kill-{round_}"
    command = [sys.executable, "-m", "cogdist", "render", manifest, "--model", "tiny-cogview4"]
    command += ["--out", str(out), "--replicas", str(args.replicas), "--batch-size", str(args.batch_size)]
    command += ["--no-progress"]
    killed = run_driver(command, kill_when=lambda: png_count(out / "outputs") >= half)
    index = cogdist_index(out) if (out / "index").exists() else []
    killed["pngs_at_kill"] = png_count(out / "outputs")
    killed["committed_at_kill"] = len(index)
    resumed = run_driver(command)
    index = cogdist_index(out)
    resumed["summary_line"] = resumed.pop("output")
    resumed["index_rows"] = len(index)
    resumed["duplicates"] = len(index) - len({r["id"] for r in index})
    resumed["rerendered"] = args.rows - killed["committed_at_kill"]
    results["cogdist_kill"] = killed
    results["cogdist_resume"] = resumed
    print(f"round {round_}: cogdist killed: {killed}; resumed: {resumed}", flush=True)

    out = work / f"ray-kill-{round_}"
    driver = [*me, "--driver", "ray-data", "--manifest", manifest, "--out", str(out), *common]
    killed = run_driver([*driver, "--run", "first"], kill_when=lambda: png_count(out / "images") >= half)
    killed["pngs_at_kill"] = png_count(out / "images")
    killed["committed_at_kill"] = len(result_rows(out))
    resumed = run_driver([*driver, "--run", "resume"])
    resumed.pop("output")
    rows = result_rows(out)
    resumed["result_rows"] = len(rows)
    resumed["duplicates"] = len(rows) - len({r["id"] for r in rows})
    resumed["missing"] = args.rows - len({r["id"] for r in rows})
    resumed["rerendered"] = sum(1 for r in rows if r["run"] == "resume")
    resumed["committed_rows_of_killed_run"] = sum(1 for r in rows if r["run"] == "first")
    images = read_images({r["id"]: r["path"] for r in rows})
    resumed["identical_to_cogdist"] = all(np.array_equal(images[k], v) for k, v in cogdist_images.items())
    results["ray_data_kill"] = killed
    results["ray_data_resume"] = resumed
    print(f"round {round_}: ray data killed: {killed}; resumed: {resumed}", flush=True)
    return results


def summarise(rounds: list[dict]) -> dict:
    def stat(key: str, field: str) -> dict:
        values = [r[key][field] for r in rounds]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    table = {}
    for name in ("cogdist", "ray_data"):
        table[name] = {
            "wall_seconds": stat(f"{name}_full", "wall_seconds"),
            "steady_seconds": stat(f"{name}_full", "steady_seconds"),
            "items_per_second_steady": stat(f"{name}_full", "items_per_second_steady"),
            "peak_rss_mb": stat(f"{name}_full", "peak_rss_mb"),
            "peak_pss_mb": stat(f"{name}_full", "peak_pss_mb"),
            "resume_wall_seconds": stat(f"{name}_resume", "wall_seconds"),
            "resume_rerendered_rows": stat(f"{name}_resume", "rerendered"),
            "resume_peak_pss_mb": stat(f"{name}_resume", "peak_pss_mb"),
            "resume_duplicates": stat(f"{name}_resume", "duplicates"),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=2, help="cogdist replicas = Ray Data actors")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per pipeline call / map batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--driver", choices=["cogdist", "ray-data"], help=argparse.SUPPRESS)
    parser.add_argument("--run", default="first", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver == "ray-data":
        ray_data_driver(args.manifest, args.out, args.replicas, args.batch_size, args.run)
        return
    if args.driver == "cogdist":
        cogdist_driver(args.manifest, args.out, args.replicas, args.batch_size)
        return

    import ray

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_manifest(work / "m.parquet", args.rows, args.size, args.steps)
        for round_ in range(args.rounds):
            rounds.append(one_round(work, round_, args))
            # Saved after every round too, so that a late failure loses no measurement.
            save("ray_data", {"rows": args.rows, "rounds": rounds, "complete": False})
    table = summarise(rounds)
    result = {
        "rows": args.rows,
        "size": args.size,
        "steps": args.steps,
        "replicas": args.replicas,
        "batch_size": args.batch_size,
        "ray": ray.__version__,
        "rounds": rounds,
        "medians": table,
    }
    for name, figures in table.items():
        print(name, json.dumps({k: v["median"] for k, v in figures.items()}))
    print(f"saved {save('ray_data', result)}")


if __name__ == "__main__":
    main()
