"""A watchdog for the embedded Ray instance.

When a driver that started Ray in process is SIGKILLed, GCS, raylet and workers exit, but Ray's
dashboard agent and runtime-env agent linger as orphans. The driver therefore starts this small
process with a pipe on its stdin: while the driver lives, it notes the driver's Ray descendants;
when the pipe closes (the driver exited, however it died) it terminates those still running.

Run as `python -m cogdist.executor.reaper DRIVER_PID`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import psutil

POLL_SECONDS = 0.5


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
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], POLL_SECONDS)
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
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=3)
    for process in still:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def start() -> subprocess.Popen:
    """Start a reaper for this process; close its stdin (or exit) to make it act."""
    return subprocess.Popen(
        [sys.executable, "-m", "cogdist.executor.reaper", str(os.getpid())],
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
