"""The chaos scenarios and their registry.

`SCENARIOS` maps a name to a function that takes a fresh, empty work folder (it may put its
manifest, OUT, logs there) and returns an `Outcome`. A scenario is self-contained: one that
needs object storage starts its own moto server (`harness.moto_server`). It must not need
pytest. To add one, write `def my_scenario(workdir: Path) -> Outcome` and register it below;
`python -m tests.chaos.report --only NAME` runs it and updates docs/reliability.md.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tests.chaos.fleet import spot_week
from tests.chaos.harness import (
    STEPS,
    Outcome,
    audit,
    chaos_manifest,
    incomplete_uploads,
    kill_repeatedly,
    make_bucket,
    moto_server,
    patched_environ,
    render_command,
    rows_per_commit,
    rows_per_fold,
)
from tests.chaos.outage import storage_outage, storage_outage_stops
from tests.chaos.progress import KillPlan
from tests.chaos.workers import (
    gang_member_kills,
    malformed_manifests,
    out_of_memory,
    poison_rows,
    preemptions,
    step_checkpoint_kill,
    worker_kills,
)


def driver_kills(
    workdir: Path,
    storage: str = "local",
    kills: int = 10,
    rows: int | None = None,
    seed: int = 20251125,
    steps: int = STEPS,
) -> Outcome:
    """SIGKILL the render driver `kills` times at points of its progress chosen at random (see
    `progress.KillPlan`), then run the same command to completion and audit OUT. `storage` is
    "local" (a folder) or "s3" (a bucket on a moto server started here). `rows` defaults to what
    the plan needs for every kill to land on a machine up to FASTEST times this one's speed;
    `steps` makes the renders slower or quicker (the check that the kills do not depend on it)."""
    if storage not in ("local", "s3"):
        raise ValueError(f"storage must be 'local' or 's3', not {storage!r}")
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    plan = KillPlan.random(kills, rng)
    needed = plan.rows_needed(rows_per_commit(), rows_per_fold())
    rows = rows or needed
    if rows < needed:
        raise ValueError(f"{kills} kills need at least {needed} rows to land on a fast machine, not {rows}")
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    injected = "SIGKILL of the driver at a point of its progress (startup / mid-render / just after a commit)"
    if storage == "local":
        out = str(workdir / "out")
        command = render_command(manifest, out, steps=steps)
        record = kill_repeatedly(command, out, plan, logs=workdir / "logs", total_rows=rows)
        found = audit(out, ids)
        extra = []
    else:
        with moto_server() as env:
            make_bucket(env, "chaos")
            out = "s3://chaos/driver-kills"
            command = render_command(manifest, out, steps=steps)
            record = kill_repeatedly(command, out, plan, env, logs=workdir / "logs", total_rows=rows)
            with patched_environ(env):
                found = audit(out, ids)
            pending = incomplete_uploads(env, "chaos", "driver-kills/")
            extra = [f"{len(pending)} incomplete multipart uploads left by killed writers"] if pending else []
    outcome = found.outcome(
        f"driver-kills-{storage}",
        injected,
        record.kills,
        time.monotonic() - started,
        "; ".join([f"seed {seed}, {rows} rows, {steps} steps", record.summary(), *extra]),
    )
    short = (
        [f"only {record.kills} of {kills} kills landed: the job finished first"]
        if record.kills < kills
        else []
    )
    outcome.problems = short + record.problems + outcome.problems
    return outcome


# name -> scenario(workdir) -> Outcome; the report lists them in this order.
SCENARIOS: dict[str, Callable[[Path], Outcome]] = {
    # At the size users run: 50 kills over 500 rows (CI runs 5, one of each kind: tests/chaos/test_driver_kills.py).
    "driver-kills-local": partial(driver_kills, storage="local", kills=50, rows=500),
    "driver-kills-s3": partial(driver_kills, storage="s3", kills=50, rows=500),
    "worker-kills": worker_kills,
    "gang-member-kills": gang_member_kills,
    "preemptions": preemptions,
    "spot-week": partial(spot_week, kills=10, rows=1300),
    "storage-outage": storage_outage,
    "storage-outage-stops": storage_outage_stops,
    "poison-rows": poison_rows,
    "out-of-memory": out_of_memory,
    "step-checkpoint": step_checkpoint_kill,
    "malformed-manifests": malformed_manifests,
}
