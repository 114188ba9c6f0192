"""Chaos scenarios on the worker side: workers and gang members SIGKILLed mid-render, poison
rows, running out of memory, and a long video item killed mid-denoising (step checkpoints).

Kills come from outside, as a preempted node or the kernel's OOM killer would deliver them:
SIGKILL to a Ray worker process of the driver's session that is executing `render`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from cogdist.storage import open_location
from tests.chaos.harness import (
    COMMIT_INTERVAL,
    ROOT,
    STEPS,
    Outcome,
    audit,
    chaos_manifest,
    make_bucket,
    patched_environ,
    render_command,
    rows_per_commit,
    settle_session,
    write_manifest,
)
from tests.chaos.outage import direct_location, flaky_store
from tests.chaos.progress import POLL_SECONDS, RENDERING, Watcher, workers


def _kill_workers(
    command: list[str],
    location,
    kills: int,
    rng: random.Random,
    logs: Path,
    gap: tuple[int, int],
    env: dict[str, str] | None = None,
    stored: bool = False,
) -> tuple[list[str], int, str]:
    """Run the render and SIGKILL a worker busy rendering `kills` times, each once the index has
    grown by a random number of rows in `gap` since the start or the last kill, while a unit is in
    flight (a worker in `render`, the index unchanged since the last look; `stored`: and outputs
    stored that are not committed, a unit's uploads done or under way while the next renders);
    let the run finish. Returns (where each kill struck, exit code, the run's whole output)."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "run.log"
    made: list[str] = []
    with open(log, "wb") as sink:
        driver = subprocess.Popen(
            command,
            cwd=ROOT,
            start_new_session=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    sid = os.getsid(driver.pid)
    watcher = Watcher(location, sid)
    try:
        # Independent failures: each kill after the job has indexed rows since the last one, so the
        # unit a kill re-queued has rendered again (a row whose render kills its worker three
        # times running is recorded as failed).
        last, wanted = watcher.rows, rng.randint(*gap)
        while len(made) < kills and driver.poll() is None:
            watcher.look()
            if watcher.rows - last >= wanted and not watcher.changed:
                busy = workers(sid, RENDERING)
                unstored = watcher.unindexed_outputs() if stored and busy else 0
                if busy and (unstored or not stored):
                    victim = rng.choice(busy)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim.pid, signal.SIGKILL)
                        uploads = f", {unstored} output(s) stored not committed" if stored else ""
                        made.append(
                            f"+{watcher.rows - last} rows ({watcher.rows} indexed), unit in flight{uploads}"
                        )
                        last, wanted = watcher.rows, rng.randint(*gap)
            time.sleep(POLL_SECONDS)
        code = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
        settle_session(sid, 10.0)
    return made, code, log.read_text(errors="replace")


def worker_kills(
    workdir: Path,
    kills: int = 5,
    rows: int | None = None,
    seed: int = 7,
    sp: int = 1,
    steps: int = STEPS,
    replicas: int | None = None,
    slow_store: float = 0.0,
) -> Outcome:
    """SIGKILL a busy worker process `kills` times during one run: each time its replica is
    rebuilt and its unit re-queued; with --max-retries 0 any kill blamed on a row would show, and
    with the default --max-gang-restarts (3) a replica whose failures were counted over the
    whole run instead of in a row would be given up. With `sp` 2 the workers are gang members: a
    member killed mid-denoising breaks its peer's collective, and the gang is rebuilt as one.
    `replicas` 1: one replica preempted again and again. `slow_store`: OUT on the S3 server behind
    a relay delaying every request by that many seconds, each kill struck while outputs are
    stored but not committed (a worker stores a unit's outputs while it renders the next). `rows`
    defaults to what every kill needs to land on a machine up to FASTEST times this one's speed."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    # With 2 replicas a re-queued unit waits behind the survivor's held units; one replica (or
    # gang) renders it first once rebuilt.
    gap = (1, 2) if sp > 1 or replicas == 1 else (4, 8)
    # On the slow store a row takes at least two requests (store, verify): the store, not the
    # machine, bounds the rows one commit holds.
    per_commit = math.ceil(COMMIT_INTERVAL / (2 * slow_store)) + 1 if slow_store else rows_per_commit()
    needed = kills * (gap[1] + per_commit) + 1
    rows = rows or needed
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    out = str(workdir / "out")
    command = render_command(manifest, out, "--max-retries", "0", steps=steps)
    if sp > 1:
        replicas = 1  # one gang of `sp` on 2 cores
        command += ["--sp", str(sp), "--collective-timeout", "30"]
    if replicas is not None:
        command[command.index("--replicas") + 1] = str(replicas)
    rng, logs = random.Random(seed), workdir / "logs"
    if slow_store:
        # Two units deep: one renders while the one before stores, so the store paces the job
        # (the per-commit bound above) and every kill lands with uploads in flight.
        command += ["--max-in-flight", "2"]
        with flaky_store(delay=slow_store) as store:
            make_bucket(store.env, "chaos")
            out = "s3://chaos/kills"
            command[command.index("--out") + 1] = out
            location = direct_location(store, out)
            made, code, said = _kill_workers(command, location, kills, rng, logs, gap, store.env, stored=True)
            with patched_environ(store.direct):
                found = audit(out, ids)
    else:
        made, code, said = _kill_workers(command, open_location(out), kills, rng, logs, gap)
        found = audit(out, ids)
    name, injected = "worker-kills", "SIGKILL of a worker process mid-render (--max-retries 0)"
    if sp > 1:
        name, injected = (
            "gang-member-kills",
            f"SIGKILL of one member of a {sp}-GPU gang (--sp {sp}) mid-render",
        )
    elif replicas == 1:
        name = "preemptions"
        injected = "the one replica's worker SIGKILLed after each stretch of progress (default --max-gang-restarts 3)"
    if slow_store:
        name += "-storing"
        injected += f", outputs stored not committed, on the S3 server {slow_store:g} s away"
    outcome = found.outcome(
        name,
        injected,
        len(made),
        time.monotonic() - started,
        f"seed {seed}, {rows} rows, {steps} steps; kills at: {'; '.join(made)}; run exit {code}; "
        f"rebuilds logged: {said.count('rebuilding it')}",
    )
    if len(made) < kills:
        outcome.problems.append(f"only {len(made)} of {kills} kills landed: the job finished first")
    if code != 0:
        outcome.problems.append(f"the run exited {code}: {said[-500:]}")
    return outcome


def gang_member_kills(workdir: Path, steps: int = STEPS) -> Outcome:
    return worker_kills(workdir, kills=3, seed=11, sp=2, steps=steps)


def preemptions(
    workdir: Path, kills: int = 10, steps: int = STEPS, rows: int | None = None, slow_store: float = 0.0
) -> Outcome:
    """One replica preempted `kills` times over a run, each after progress: it is rebuilt every
    time (a rendered unit resets its count of failures in a row), and the job ends with exit 0."""
    return worker_kills(
        workdir, kills=kills, seed=13, steps=steps, replicas=1, rows=rows, slow_store=slow_store
    )


def poison_rows(workdir: Path, rows: int = 24, poisoned: int = 4) -> Outcome:
    """Rows whose conditioning image cannot be decoded fail every attempt: recorded under
    failures/ after --max-retries, the rest finish; a plain re-run skips them, and once the
    images are fixed `--retry-failed` renders them."""
    from cogdist.sink.ledger import FAILURES, read_table
    from cogdist.storage import open_location

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    images = workdir / "images"
    images.mkdir(exist_ok=True)
    records, bad = [], []
    for i in range(rows):
        record = {"id": f"poison/{i:03d}", "prompt": f"a red house number {i}", "image": None}
        if i % (rows // poisoned) == 1 and len(bad) < poisoned:
            path = images / f"{i}.png"
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            record["image"] = str(path)
            bad.append(record["id"])
        records.append(record)
    manifest = write_manifest(workdir / "manifest.parquet", records)
    out = str(workdir / "out")
    base = [
        sys.executable,
        "-m",
        "cogdist",
        "render",
        str(manifest),
        "--model",
        "tiny-glm-image",
        "--out",
        out,
    ]
    base += ["--no-progress", "--width", "64", "--height", "64", "--steps", "2", "--max-retries", "2"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)

    problems = []
    first = run()
    location = open_location(out)
    failures = read_table(location, FAILURES)
    recorded = {} if failures is None else {r["id"]: r for r in failures.to_pylist()}
    if first.returncode != 1 or sorted(recorded) != sorted(bad):
        problems.append(f"first run: exit {first.returncode}, failures {sorted(recorded)} (expected {bad})")
    wrong = [i for i, r in recorded.items() if r["attempts"] != 3 or "cannot be decoded" not in r["error"]]
    if wrong:
        problems.append(f"failure records without 3 attempts or the decode error: {wrong}")
    again = run()
    said = again.stdout + again.stderr
    if again.returncode != 1 or not re.search(rf"0 rendered, {rows - poisoned} already done", said):
        problems.append(f"a plain re-run did not skip the failed rows: {said[-300:]}")
    for record in records:  # the user fixes the inputs
        if record["image"]:
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
            Path(record["image"]).write_bytes(buffer.getvalue())
    retried = run("--retry-failed")
    if retried.returncode != 0:
        problems.append(f"--retry-failed exited {retried.returncode}: {retried.stderr[-300:]}")
    found = audit(out, {r["id"] for r in records})
    outcome = found.outcome(
        "poison-rows",
        "undecodable conditioning image (tiny-glm-image, --max-retries 2)",
        len(bad),
        time.monotonic() - started,
        f"{len(recorded)} recorded under failures/ with attempts "
        f"{sorted({r['attempts'] for r in recorded.values()})}; a plain re-run skipped them; "
        f"--retry-failed after fixing the images rendered them",
    )
    outcome.problems = problems + outcome.problems
    return outcome


def out_of_memory(workdir: Path, rows: int = 12) -> Outcome:
    """A row that runs out of memory unless VAE tiling is on, and one that always does (an
    injected torch.OutOfMemoryError in the transformer): the first renders after the
    memory-saving retry without losing an attempt, the second is recorded as failed."""
    import pyarrow.dataset as ds

    from cogdist import engine
    from cogdist.options import RenderOptions
    from tests.faults import out_of_memory as oom_worker

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    once, always = sorted(ids)[2], sorted(ids)[7]
    out = str(workdir / "out")
    log = workdir / "calls.jsonl"
    options = RenderOptions(
        str(manifest), "tiny-cogview4", out, progress=False, replicas=1, batch_size=2, max_retries=1, steps=4
    )
    summary = engine.run(options, worker_class=oom_worker(log, once=once, always=always))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    found = audit(out, ids, expected_failed={always})
    index = ds.dataset(f"{out}/index").to_table().to_pylist()
    attempts = {r["id"]: r["attempts"] for r in index}
    problems = [] if attempts.get(once) == 1 else [f"{once} took {attempts.get(once)} attempts"]
    outcome = found.outcome(
        "out-of-memory",
        "torch.OutOfMemoryError in the transformer (one row until tiling is on, one always)",
        sum(c["oom"] for c in calls),
        time.monotonic() - started,
        f"{summary.done} rendered, {summary.failed} failed; {once} rendered in 1 attempt after the "
        f"memory-saving retry; {always} recorded after 2 attempts",
    )
    outcome.problems = problems + outcome.problems
    return outcome


def step_checkpoint_kill(workdir: Path) -> Outcome:
    """A long video item (tiny CogVideoX, 40 steps) whose driver is SIGKILLed mid-denoising
    resumes from its last step checkpoint and equals an uninterrupted render."""
    import pyarrow.dataset as ds
    import torch

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(workdir / "m.parquet", [{"id": "long/1", "prompt": "a long walk on a beach"}])
    settings = ["--model", "tiny-cogvideox", "--width", "96", "--height", "96", "--frames", "17"]
    settings += ["--steps", "40", "--replicas", "1", "--step-checkpoint", "4", "--no-progress"]
    out, reference = workdir / "out", workdir / "reference"
    command = [sys.executable, "-m", "cogdist", "render", str(manifest), *settings]
    folder = out / "_cogdist" / "checkpoints"

    def saved() -> int:
        for path in folder.rglob("*.pt"):
            try:
                return torch.load(path, weights_only=True)["step"]
            except Exception:
                return 0
        return 0

    driver = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sid = os.getsid(driver.pid)
    # The kill waits for the job's progress: step 12 of 40 saved, the item mid-denoising.
    while saved() < 12 and driver.poll() is None:
        time.sleep(POLL_SECONDS)
    killed_at = saved()
    landed = driver.poll() is None
    if landed:
        os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    settle_session(sid, 10.0)
    resumed = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    plain = subprocess.run(
        [*command, "--out", str(reference)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    problems = [] if landed else ["the render finished before step 12 was saved: no kill landed"]
    match = re.search(r"resuming long/1 from step (\d+)", resumed.stderr)
    if resumed.returncode or plain.returncode or not match:
        problems.append(
            f"resume exit {resumed.returncode}, reference exit {plain.returncode}, resumed: {bool(match)}"
        )
    ours = ds.dataset(str(out / "index")).to_table().to_pylist()
    theirs = ds.dataset(str(reference / "index")).to_table().to_pylist()
    if [r["sha256"] for r in ours] != [r["sha256"] for r in theirs]:
        problems.append("the resumed video differs from the uninterrupted render")
    if list(folder.rglob("*.pt")):
        problems.append("the finished item's checkpoint was not removed")
    found = audit(str(out), {"long/1"})
    outcome = found.outcome(
        "step-checkpoint",
        "SIGKILL of the driver mid-denoising of a 40-step video (--step-checkpoint 4)",
        int(landed),
        time.monotonic() - started,
        f"killed with step {killed_at} saved; resumed from step {match.group(1) if match else '?'}; "
        "output sha256 equal to an uninterrupted render; checkpoint removed",
    )
    outcome.problems = problems + outcome.problems
    return outcome


def malformed_manifests(workdir: Path) -> Outcome:
    """Hostile manifests: the hypothesis properties of tests/test_manifest_properties.py (every
    generated manifest is accepted or refused with a message naming row and column, never a
    traceback), then hostile manifests rendered into an OUT holding a finished job: each is
    refused (exit 2) and OUT is left byte for byte as it was."""
    import hashlib

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    problems = []
    properties = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",  # in one process: hypothesis reports its statistics there only
            "--hypothesis-show-statistics",
            "tests/test_manifest_properties.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    examples = sum(int(n) for n in re.findall(r"(\d+) passing, \d+ failing", properties.stdout))
    if properties.returncode != 0:
        problems.append(f"property tests failed: {properties.stdout[-500:]}")

    manifest, ids = chaos_manifest(workdir / "good.parquet", 6)
    out = workdir / "out"
    done = subprocess.run(
        render_command(manifest, str(out)), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        problems.append(f"the first job failed: {done.stderr[-300:]}")

    def snapshot() -> dict[str, str]:
        return {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*")
            if p.is_file()
        }

    before = snapshot()
    hostile = {
        "path traversal id": [{"id": "../../escape", "prompt": "x"}, {"id": "ok", "prompt": None}],
        "NaN guidance, negative width": [
            {"id": "a", "prompt": "x", "guidance_scale": float("nan"), "width": -64}
        ],
        "zero rows": [],
        "not Parquet": None,
    }
    refused = 0
    for name, rows in hostile.items():
        path = workdir / f"{name.replace(' ', '_')}.parquet"
        if rows is None:
            path.write_bytes(b"id,prompt\n1,hello\n")
        elif rows:
            write_manifest(path, rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(
                pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), path
            )
        run = subprocess.run(
            render_command(path, str(out)), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        said = run.stdout + run.stderr
        if "Traceback" in said:
            problems.append(f"{name}: a traceback: {said[-300:]}")
        elif name == "zero rows" and run.returncode in (0, 2):
            refused += 1  # nothing to do, or refused as a different job: both leave OUT alone
        elif run.returncode == 2:
            refused += 1
        else:
            problems.append(f"{name}: exit {run.returncode}: {said[-300:]}")
    if snapshot() != before:
        problems.append("a refused manifest changed OUT")
    outcome = Outcome(
        scenario="malformed-manifests",
        injected="generated hostile manifests (hypothesis) and hostile renders into a finished OUT",
        times=examples + len(hostile),
        expected=len(ids),
        indexed=len(ids) if not problems else 0,
        duplicates=0,
        lost=0,
        failed=0,
        problems=problems,
        seconds=round(time.monotonic() - started, 1),
        notes=f"{examples} generated examples passed the properties; {refused}/{len(hostile)} hostile renders "
        "refused with OUT unchanged (its 6 finished rows kept)",
    )
    return outcome
