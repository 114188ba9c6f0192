"""Run a function on every rank of a real gloo gang of local processes (no Ray).

`run_gang(layout, fn, *args)` forms the gang's group with `cogdist.parallel.group.init_gang` on
CPU in that many processes, runs `fn(gang, *args)` on each and returns `{rank: result}`. `fn` must
be a module-level function (it is pickled by reference); results must be picklable.

The processes are spawned once per test session and kept (a pool of POOL_SIZE ranks): starting a
process that imports torch and diffusers costs seconds of CPU, forming a group a fraction of one.
Each call forms a fresh group on a fresh port among the first `layout.world_size` of them and
destroys it afterwards, so calls do not share a group. A call that fails or times out ends the
pool; the next call spawns a new one.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch

from cogdist.parallel.group import Layout

GANG_TIMEOUT = 300.0
POOL_SIZE = 4
"""The largest gang a test forms (sp 2 x cfg 2)."""


def _to_bytes(value: Any) -> bytes:
    # Tensors put on a queue as they are travel by shared memory, which vanishes with the rank.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(rank: int, jobs, results) -> None:
    """One rank of the pool: take (layout, port, fn, args) jobs until None."""
    from cogdist.parallel.group import init_gang, leave_gang
    from cogdist.worker.settings import WorkerSettings

    torch.set_num_threads(1)  # ranks share the machine's cores
    while (job := jobs.get()) is not None:
        layout, port, fn, args = job
        try:
            gang = init_gang(
                layout,
                rank,
                ("127.0.0.1", port),
                torch.device("cpu"),
                init_timeout=60,
                collective_timeout=WorkerSettings().collective_timeout,
            )
            try:
                results.put((rank, True, _to_bytes(fn(gang, *args))))
            finally:
                leave_gang()
        except BaseException:
            results.put((rank, False, traceback.format_exc()))


class _Pool:
    def __init__(self) -> None:
        context = mp.get_context("spawn")
        self.results = context.Queue()
        self.jobs = [context.Queue() for _ in range(POOL_SIZE)]
        self.processes = [
            context.Process(target=_rank_main, args=(rank, self.jobs[rank], self.results), daemon=True)
            for rank in range(POOL_SIZE)
        ]
        for process in self.processes:
            process.start()

    def alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def close(self) -> None:
        for jobs, process in zip(self.jobs, self.processes):
            if process.is_alive():
                jobs.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


_pool: _Pool | None = None


def _shared_pool() -> _Pool:
    global _pool
    if _pool is None or not _pool.alive():
        if _pool is not None:
            _pool.close()
        _pool = _Pool()
        atexit.register(_pool.close)
    return _pool


def run_gang(layout: Layout, fn: Callable, *args: Any, timeout: float = GANG_TIMEOUT) -> dict[int, Any]:
    global _pool
    from tests.conftest import free_port

    if layout.world_size > POOL_SIZE:
        raise ValueError(f"a gang of {layout.world_size} needs POOL_SIZE >= {layout.world_size}")
    pool = _shared_pool()
    port = free_port()
    for rank in range(layout.world_size):
        pool.jobs[rank].put((layout, port, fn, args))
    collected: dict[int, Any] = {}
    try:
        for _ in range(layout.world_size):
            try:
                rank, ok, value = pool.results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"the gang did not finish within {timeout:.0f}s") from None
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except BaseException:
        # The other ranks may be stuck in a collective of the failed call: start over next time.
        pool.close()
        _pool = None
        raise
    return collected
