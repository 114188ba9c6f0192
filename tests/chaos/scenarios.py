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

from tests.chaos.harness import (
    Outcome,
    audit,
    chaos_manifest,
    incomplete_uploads,
    kill_repeatedly,
    make_bucket,
    moto_server,
    patched_environ,
    render_command,
)
from tests.chaos.outage import storage_outage, storage_outage_stops
from tests.chaos.workers import (
    gang_member_kills,
    malformed_manifests,
    out_of_memory,
    poison_rows,
    step_checkpoint_kill,
    worker_kills,
)


def driver_kills(
    workdir: Path, storage: str = "local", kills: int = 10, rows: int = 120, seed: int = 20251125
) -> Outcome:
    """SIGKILL the render driver `kills` times at random moments (see
    `harness.kill_repeatedly`), then run the same command to completion and audit OUT.
    `storage` is "local" (a folder) or "s3" (a bucket on a moto server started here)."""
    if storage not in ("local", "s3"):
        raise ValueError(f"storage must be 'local' or 's3', not {storage!r}")
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    rng = random.Random(seed)
    injected = "SIGKILL of the driver at a random moment (startup / mid-render / around a commit)"
    if storage == "local":
        out = str(workdir / "out")
        record = kill_repeatedly(
            render_command(manifest, out), out, kills, rng, logs=workdir / "logs", total_rows=rows
        )
        found = audit(out, ids)
        extra = []
    else:
        with moto_server() as env:
            make_bucket(env, "chaos")
            out = "s3://chaos/driver-kills"
            record = kill_repeatedly(
                render_command(manifest, out), out, kills, rng, env, logs=workdir / "logs", total_rows=rows
            )
            with patched_environ(env):
                found = audit(out, ids)
            pending = incomplete_uploads(env, "chaos", "driver-kills/")
            extra = [f"{len(pending)} incomplete multipart uploads left by killed writers"] if pending else []
    outcome = found.outcome(
        f"driver-kills-{storage}",
        injected,
        record.kills,
        time.monotonic() - started,
        "; ".join([f"seed {seed}", record.summary(), *extra]),
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
    "driver-kills-local": partial(driver_kills, storage="local"),
    "driver-kills-s3": partial(driver_kills, storage="s3"),
    "worker-kills": worker_kills,
    "gang-member-kills": gang_member_kills,
    "storage-outage": storage_outage,
    "storage-outage-stops": storage_outage_stops,
    "poison-rows": poison_rows,
    "out-of-memory": out_of_memory,
    "step-checkpoint": step_checkpoint_kill,
    "malformed-manifests": malformed_manifests,
}
