"""A week of commits: index parts, resume-scan seconds and peak memory after a long run.

    python -m benchmarks.index_week [--days 7] [--rate 10] [--restarts 7] [--before-hours 2]

Drives the driver's own IndexWriter (cogdist.sink.journal) with an injected clock, so a week of
commits takes minutes: RATE rows/s, a commit every --commit-interval (2 s), the journal folded
into index/ as the engine does, and the driver killed RESTARTS times along the way (each restart
recovers the journal first, as a resume does). Then, in a fresh process, what a resume does
before it starts Ray (read index/'s ids, recover the journal) and what `cogdist status` reads
(done ids, index and journal), timed with its peak memory: on the local folder, and again after
copying the same OUT to an S3 server (moto, started here). `--before-hours` does the same for the
index as it was before the journal (one part per commit) over that many hours, and the week's
figures of that layout are extrapolated from it. Results: benchmarks/results/index_week.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from benchmarks.common import save

SCAN = r"""
import json, sys, time
start = time.perf_counter()


def peak_rss_mb():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM"))) / 1024


from cogdist.sink.journal import done_ids, recover
from cogdist.sink.ledger import INDEX, read_ids
from cogdist.storage import open_location
out = open_location(sys.argv[1])
imported = time.perf_counter()
status = len(done_ids(out))
read = time.perf_counter()
done = read_ids(out, INDEX)
recovered = recover(out, done) if sys.argv[2] == "resume" else []  # "status": reads only
end = time.perf_counter()
print(json.dumps({
    "status_seconds": round(read - imported, 3),
    "resume_seconds": round(end - read, 3),
    "done": status,
    "recovered": len(recovered),
    "index_parts": len(out.list_files(INDEX, ".parquet")),
    "peak_rss_mb": round(peak_rss_mb()),
}))
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def row(i: int, finished_at) -> dict:
    path = f"outputs/{i % 256:02x}/row-{i:09d}_0123456789abcdef0123.png"
    return {
        "id": f"row-{i:09d}",
        "prompt": f"a photo of subject {i % 5000} in style {i % 37}",
        "uri": f"s3://bucket/out/{path}",
        "path": path,
        "seed": i,
        "width": 1024,
        "height": 1024,
        "task": "text-to-image",
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "model": "THUDM/CogView4-6B",
        "format": "png",
        "bytes": 1_500_000,
        "sha256": "0" * 64,
        "render_seconds": 5.0,
        "replica": i % 1000,
        "node": "node-0",
        "finished_at": finished_at,
        "attempts": 1,
    }


def simulate(out_dir: Path, args: argparse.Namespace, journal: bool, seconds: float) -> dict:
    """`seconds` of a job at RATE rows/s; returns rows, commits, parts and the wall time taken."""
    import pyarrow as pa

    from cogdist.sink.journal import IndexWriter, recover
    from cogdist.sink.ledger import INDEX, PartWriter, index_schema, now_utc, read_ids
    from cogdist.storage import open_location

    out = open_location(str(out_dir))
    schema = index_schema(pa.schema([("id", pa.string()), ("prompt", pa.string())]))
    clock = Clock()
    restarts = args.restarts if journal else 0
    restart_every = seconds / (restarts + 1)
    per_commit = round(args.rate * args.commit_interval)
    commits = int(seconds / args.commit_interval)
    finished_at = now_utc()
    started = time.perf_counter()

    def writer():
        if journal:
            return IndexWriter(out, schema, args.commit_interval, args.index_interval, clock=clock)
        return PartWriter(out, INDEX, schema)

    current, next_restart, recovered, n = writer(), restart_every, 0, 0
    for commit in range(commits):
        current.add([row(n + k, finished_at) for k in range(per_commit)])
        n += per_commit
        clock.now += args.commit_interval
        current.commit()
        if journal and clock.now >= next_restart and next_restart < seconds - 1:
            # The driver is killed here (no final fold) and the job resumed with the same command.
            recovered += len(recover(out, read_ids(out, INDEX)))
            current, next_restart = writer(), next_restart + restart_every
        if commit % 20_000 == 0:
            print(f"  {clock.now / 3600:.1f} h simulated, {n} rows", flush=True)
    # The run ends as a kill leaves it (the journal holding up to --index-interval of rows): the
    # state a resume finds.
    return {
        "simulated_hours": round(seconds / 3600, 2),
        "rows": n,
        "commits": commits,
        "restarts": restarts,
        "rows_recovered_from_the_journal": recovered,
        "index_parts": len(out.list_files(INDEX, ".parquet")),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def scan(uri: str, env: dict | None = None, runs: int = 3) -> list[dict]:
    """What `cogdist status` and a resume read of `uri`, each run in a fresh process: `runs` that
    read only, then the resume, which folds the journal into index/."""
    import os

    results = []
    for mode in ["status"] * runs + ["resume"]:
        done = subprocess.run(
            [sys.executable, "-c", SCAN, uri, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **(env or {})},
        )
        results.append(json.loads(done.stdout))
        print(f"  {results[-1]}", flush=True)
    return results


def on_s3(local: Path, name: str) -> list[dict]:
    """Copy the OUT in `local` to a bucket of a moto server started here, then scan it there."""
    from tests.chaos.harness import make_bucket, moto_server, patched_environ

    with moto_server() as env:
        make_bucket(env, "bench")
        with patched_environ(env):
            s3 = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http")
            started = time.perf_counter()
            pafs.copy_files(str(local), f"bench/{name}", destination_filesystem=s3, use_threads=True)
            print(f"  copied to the S3 server in {time.perf_counter() - started:.0f}s", flush=True)
        return scan(f"s3://bench/{name}", env)


def best(runs: list[dict]) -> dict:
    """The best of the read-only runs, and the resume (read + recovery)."""
    reads, resume = runs[:-1], runs[-1]
    return {
        "status_seconds": min(r["status_seconds"] for r in reads),
        "resume_seconds": resume["resume_seconds"],  # index/'s ids read, the journal recovered
        "rows_recovered_by_the_resume": resume["recovered"],
        "index_parts_after_the_resume": resume["index_parts"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--rate", type=float, default=10.0, help="rows finished per second")
    parser.add_argument("--commit-interval", type=float, default=2.0)
    parser.add_argument("--index-interval", type=float, default=600.0)
    parser.add_argument("--restarts", type=int, default=7, help="driver kills over the run (resumed)")
    parser.add_argument("--before-hours", type=float, default=2.0, help="hours of the old layout measured")
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()
    week = args.days * 86400
    result: dict = {
        "rate": args.rate,
        "commit_interval": args.commit_interval,
        "index_interval": args.index_interval,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for layout, journal, seconds in (
            ("before", False, args.before_hours * 3600),
            ("journal", True, week),
        ):
            folder = Path(tmp) / layout
            print(f"{layout}: simulating {seconds / 3600:.1f} h", flush=True)
            entry = simulate(folder, args, journal, seconds)
            print(f"  {entry}", flush=True)
            if not args.no_s3:  # a copy as the run left it: the local resume folds the journal
                shutil.copytree(folder, Path(tmp) / f"{layout}-s3")
            entry["local"] = best(scan(str(folder)))
            if not args.no_s3:
                entry["s3"] = best(on_s3(Path(tmp) / f"{layout}-s3", layout))
            result[layout] = entry
    before, scale = result["before"], week / (args.before_hours * 3600)
    result["before_extrapolated_to_the_run"] = {
        "index_parts": round(before["index_parts"] * scale),
        **{
            where: {key: round(before[where][key] * scale, 1) for key in ("status_seconds", "resume_seconds")}
            for where in ("local", "s3")
            if where in before
        },
        "how": "linear in the parts: the old layout's seconds per part times the run's commits",
    }
    result["targets"] = "resume under 5 s locally and under 30 s on the S3 server after 7 days at 10 rows/s"
    print(f"saved {save('index_week', result)}")


if __name__ == "__main__":
    main()
