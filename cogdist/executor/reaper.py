"""A watchdog for the embedded Ray instance.

When a driver that started Ray in process is SIGKILLed, GCS, raylet and workers exit, but Ray's
dashboard agent and runtime-env agent linger as orphans. The driver therefore starts this small
process with a pipe on its stdin: while the driver lives, it notes the driver's Ray descendants;
when the pipe closes (the driver exited, however it died) it terminates those still running.

Run as `python path/to/reaper.py DRIVER_PID`: by its file, so that it imports psutil alone, not
the cogdist package (whose import costs a second of CPU at every render's start).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

import psutil

# Ray starts its daemons and agents in the first seconds; after that, poll gently so the
# watchdog costs the renders nothing measurable.
FAST_POLL_SECONDS, SLOW_POLL_SECONDS, FAST_PERIOD_SECONDS = 0.5, 2.0, 30.0


def _is_ray(process: psutil.Process) -> bool:
    try:
        name = process.name()
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return name.startswith(("ray::", "raylet", "gcs_server")) or "/ray/" in cmdline or "ray::" in cmdline


def watch(driver_pid: int) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    started = time.monotonic()
    while True:
        fast = time.monotonic() - started < FAST_PERIOD_SECONDS
        readable, _, _ = select.select([sys.stdin], [], [], FAST_POLL_SECONDS if fast else SLOW_POLL_SECONDS)
        if readable and not sys.stdin.buffer.read1(1024):
            break  # EOF: the driver closed the pipe or died
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid() and child.pid not in seen and _is_ray(child):
                    seen[child.pid] = child
        except psutil.NoSuchProcess:
            break
    # psutil.Process remembers each process's start time, so a recycled pid is never signalled.
    alive = [p for p in seen.values() if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, still = psutil.wait_procs(alive, timeout=3)
    for process in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def start() -> subprocess.Popen:
    """Start a reaper for this process; close its stdin (or exit) to make it act."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(reaper: subprocess.Popen, timeout: float = 10) -> None:
    if reaper.stdin:
        reaper.stdin.close()
    deadline = time.monotonic() + timeout
    while reaper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
