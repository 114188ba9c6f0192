"""Run a function on every rank of a real gloo gang of local processes (no Ray).

`run_gang(layout, fn, *args)` starts one spawned process per rank, forms the group with
`cogdist.parallel.group.init_gang` on CPU and returns `{rank: fn(gang, *args)}`. `fn` must be a
module-level function (it is pickled by reference); results must be picklable.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch

from cogdist.parallel.group import Layout

GANG_TIMEOUT = 300.0


def _to_bytes(value: Any) -> bytes:
    # Tensors put on a queue as they are travel by shared memory, which vanishes with the rank.
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(layout: Layout, rank: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch

    from cogdist.parallel.group import init_gang, leave_gang

    torch.set_num_threads(1)  # ranks share the machine's cores
    try:
        gang = init_gang(layout, rank, ("127.0.0.1", port), torch.device("cpu"), init_timeout=60)
        try:
            results.put((rank, True, _to_bytes(fn(gang, *args))))
        finally:
            leave_gang()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_gang(layout: Layout, fn: Callable, *args: Any, timeout: float = GANG_TIMEOUT) -> dict[int, Any]:
    from tests.conftest import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(layout, rank, port, fn, args, results), daemon=True)
        for rank in range(layout.world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in processes:
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty:
        raise AssertionError(f"the gang did not finish within {timeout:.0f}s") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return collected
