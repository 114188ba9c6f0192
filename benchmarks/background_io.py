"""Background I/O: the same rows rendered to the S3 server directly and through a relay that
delays every request by 0.3 s, as a distant store would.

    python -m benchmarks.background_io [--rows 384] [--size 128] [--steps 8] [--rounds 3] [--delay 0.3]
        [--max-in-flight 64]

A worker stores a unit's outputs while it renders the next, so the delay should cost the run
almost nothing: the goal is >= 0.95x the undelayed rows/s (steady state, medians of interleaved
rounds). The delay reaches the workers' uploads and the driver's index commits alike, since it
sits in the network path, not in a filesystem wrapper of one process. moto's standalone server
and the relay are tests/chaos's. The steady state ends with the job's last commit, which a slow
store makes slower once per job (~2 s through 0.3 s: the last unit's uploads, the final fold):
384 rows (~50 s undelayed) keep that fixed cost to a few percent, where 96 made it a fifth.
Results go to benchmarks/results/background_io.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import cogdist
from benchmarks.common import save, timings
from benchmarks.overhead import make_manifest
from cogdist.options import RenderOptions
from tests.chaos.harness import make_bucket, patched_environ
from tests.chaos.outage import flaky_store


def run(manifest: Path, env: dict[str, str], out: str, max_in_flight: int) -> dict:
    with patched_environ(env):
        summary = cogdist.render(
            str(manifest),
            model="tiny-cogview4",
            out=out,
            replicas=1,
            progress=False,
            max_in_flight=max_in_flight,
        )
    assert summary.ok, summary
    return timings(summary)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.3)
    parser.add_argument(
        "--max-in-flight", type=int, default=RenderOptions.max_in_flight, help="default: cogdist's"
    )
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"direct": [], "delayed": []}
    with tempfile.TemporaryDirectory() as tmp, flaky_store(delay=args.delay) as store:
        manifest = Path(tmp) / "m.parquet"
        make_manifest(manifest, args.rows, args.size, args.steps)
        make_bucket(store.direct, "bench")
        os.environ.pop("RAY_ADDRESS", None)
        for round_ in range(args.rounds):
            for name, env in (("direct", store.direct), ("delayed", store.env)):
                result = run(manifest, env, f"s3://bench/{name}-{round_}", args.max_in_flight)
                runs[name].append(result)
                print(f"round {round_}: {name}: {result}", flush=True)

    rate = {name: statistics.median(r["items_per_second"] for r in results) for name, results in runs.items()}
    result = {
        "rows": args.rows,
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "delay_seconds_per_request": args.delay,
        "max_in_flight": args.max_in_flight,
        "runs": runs,
        "median_items_per_second": rate,
        "delayed_over_direct": round(rate["delayed"] / rate["direct"], 3),
        "goal": "delayed >= 0.95 x direct rows/s (steady state)",
    }
    print(f"delayed / direct rows/s (medians): {result['delayed_over_direct']}")
    print(f"saved {save('background_io', result)}")


if __name__ == "__main__":
    main()
