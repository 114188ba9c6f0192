"""Replica scaling and worker busy fraction: the same rows at 1, 2, ... replicas on the CPU.

    python -m benchmarks.replicas [--rows 48] [--size 512] [--steps 6] [--rounds 3] [--replicas 1,2]

Renders the same `tiny-cogview4` rows with `cogdist.render` at each replica count (default: 1, 2
and `os.cpu_count()` if larger), in interleaved rounds because a shared machine is noisy.
Throughput is the steady state as overhead.py measures it: rows over the time from the first
ready replica to the last index commit. Each replica's busy fraction comes from the index: the
sum of its rows' `render_seconds` (the worker's own time on a row) over the run's steady time;
and, since a replica can become ready later than the first one, also over its own active window
(its first row's start to its last row's end, from `finished_at - render_seconds`).
Results go to benchmarks/results/replicas.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds

import cogdist
from benchmarks.common import save, timings
from benchmarks.overhead import make_manifest


def replica_usage(out: Path, steady_seconds: float) -> list[dict]:
    """Rows, busy seconds and busy fractions of each replica, from the index."""
    table = ds.dataset(str(out / "index")).to_table(columns=["replica", "render_seconds", "finished_at"])
    usage = []
    for replica in sorted(set(table.column("replica").to_pylist())):
        rows = table.filter(pc.equal(table.column("replica"), replica))
        busy = pc.sum(rows.column("render_seconds")).as_py()
        ends = [t.timestamp() for t in rows.column("finished_at").to_pylist()]
        starts = [end - s for end, s in zip(ends, rows.column("render_seconds").to_pylist())]
        window = max(ends) - min(starts)
        usage.append(
            {
                "replica": replica,
                "rows": rows.num_rows,
                "busy_seconds": round(busy, 2),
                "busy_fraction_of_steady": round(busy / steady_seconds, 3),
                "active_window_seconds": round(window, 2),
                "busy_fraction_of_window": round(busy / window, 3),
            }
        )
    return usage


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(manifest: Path, out: Path, replicas: int) -> dict:
    cpu_before = cpu_seconds()
    summary = cogdist.render(
        str(manifest), model="tiny-cogview4", out=str(out), replicas=replicas, progress=False
    )
    # The driver's own CPU time (scheduler, commits, Ray's client threads): it shares the cores
    # with the workers.
    driver_cpu = cpu_seconds() - cpu_before
    assert summary.ok and summary.done == summary.total, summary
    steady = summary.steady_seconds
    return {
        **timings(summary),
        "driver_cpu_seconds": round(driver_cpu, 2),
        "replicas": replica_usage(out, steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--replicas",
        default=",".join(str(n) for n in sorted({1, 2, os.cpu_count() or 1})),
        help="comma-separated replica counts (default: 1, 2 and the core count)",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]

    runs: dict[str, list[dict]] = {f"replicas={n}": [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_manifest(work / "m.parquet", args.rows, args.size, args.steps)
        for round_ in range(args.rounds):
            for n in counts:
                result = run(work / "m.parquet", work / f"out-{n}-{round_}", n)
                runs[f"replicas={n}"].append(result)
                print(f"round {round_}: replicas={n}: {result}", flush=True)

    medians = {}
    for name, results in runs.items():
        fractions = [r["busy_fraction_of_steady"] for result in results for r in result["replicas"]]
        windows = [r["busy_fraction_of_window"] for result in results for r in result["replicas"]]
        medians[name] = {
            "items_per_second": statistics.median(r["items_per_second"] for r in results),
            "items_per_second_range": [
                min(r["items_per_second"] for r in results),
                max(r["items_per_second"] for r in results),
            ],
            "steady_seconds": statistics.median(r["steady_seconds"] for r in results),
            "busy_fraction_of_steady_range": [min(fractions), max(fractions)],
            "busy_fraction_of_window_range": [min(windows), max(windows)],
        }
    base = medians[f"replicas={counts[0]}"]["items_per_second"]
    for name in medians:
        medians[name]["speedup_vs_first"] = round(medians[name]["items_per_second"] / base, 3)
        # Within a round the runs are minutes apart, so this ratio is less exposed to the shared
        # machine's slow drifts than the ratio of medians.
        medians[name]["speedup_vs_first_per_round"] = [
            round(run["items_per_second"] / first["items_per_second"], 3)
            for run, first in zip(runs[name], runs[f"replicas={counts[0]}"])
        ]
    result = {
        "rows": args.rows,
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "runs": runs,
        "medians": medians,
        "goal": "items/s grows with replicas on the available cores; busy fraction >= 0.95",
    }
    for name, m in medians.items():
        print(
            f"{name}: {m['items_per_second']} items/s (range {m['items_per_second_range']}), "
            f"x{m['speedup_vs_first']} (per round {m['speedup_vs_first_per_round']}); "
            f"busy/steady {m['busy_fraction_of_steady_range']}, "
            f"busy/window {m['busy_fraction_of_window_range']}"
        )
    print(f"saved {save('replicas', result)}")


if __name__ == "__main__":
    main()
