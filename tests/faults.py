"""Workers with injected faults, for tests. Shipped to Ray by value (see register_pickle_by_value)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from ray import cloudpickle

from cogdist.worker.inputs import InputError
from cogdist.worker.worker import RenderWorker


class PoisonWorker(RenderWorker):
    """Raises for every row whose prompt contains 'poison', as an undecodable input would."""

    def render_pixels(self, unit, prepared):
        for item in unit.items:
            if "poison" in item.prompt:
                raise ValueError(f"cannot render {item.id}: poisoned prompt")
        return super().render_pixels(unit, prepared)


def dying_worker(marker_dir: Path, victim: str) -> type:
    """A worker whose process exits hard the first time it renders `victim`."""

    class DyingWorker(RenderWorker):
        def render_pixels(self, unit, prepared):
            marker = Path(marker_dir) / "died"
            if any(i.id == victim for i in unit.items) and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().render_pixels(unit, prepared)

    return DyingWorker


def dying_member(marker_dir: Path, victims: dict[str, int]) -> type:
    """A gang whose member of rank `victims[id]` exits hard in the middle of denoising that row,
    once per row; each death leaves a file `died-<id>` in `marker_dir`."""

    class DyingMember(RenderWorker):
        def render_pixels(self, unit, prepared):
            for item in unit.items:
                marker = Path(marker_dir) / f"died-{item.id.replace('/', '_')}"
                if victims.get(item.id) == self.rank and not marker.exists():
                    self._die_on_second_step(marker)
            return super().render_pixels(unit, prepared)

        def _die_on_second_step(self, marker: Path) -> None:
            calls = []

            def die(module, args, kwargs):
                calls.append(1)
                if len(calls) == 2:
                    marker.write_text(str(os.getpid()))
                    os._exit(1)

            self.pipe.transformer.register_forward_pre_hook(die, with_kwargs=True)

    return DyingMember


def hanging_member(marker_dir: Path, victim: str, rank: int) -> type:
    """A gang member that stops answering (sleeps) before rendering `victim`, once."""

    class HangingMember(RenderWorker):
        def render_pixels(self, unit, prepared):
            marker = Path(marker_dir) / "hung"
            if self.rank == rank and any(i.id == victim for i in unit.items) and not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(3600)
            return super().render_pixels(unit, prepared)

    return HangingMember


def unreadable_on_one_rank(marker_dir: Path, victim: str, rank: int) -> type:
    """A gang member that cannot read `victim`'s input once (a transient error on its node)."""

    class UnreadableOnOneRank(RenderWorker):
        def _load(self, item):
            marker = Path(marker_dir) / "unreadable"
            if self.rank == rank and item.id == victim and not marker.exists():
                marker.write_text(str(os.getpid()))
                raise InputError(f"cannot read the input of {item.id}: connection reset")
            return super()._load(item)

    return UnreadableOnOneRank


def timed_worker(
    log_dir: Path, slow_width: int, wait_for: int, bound: float = 120.0, storing: bool = False
) -> type:
    """A worker that logs every unit it renders as a JSON line (pid, ids, start, end) in `log_dir`,
    and holds a unit of rows of width `slow_width` until `wait_for` other units are logged (at most
    `bound` seconds): slow by the job's progress, not by the clock. A unit queued behind the slow
    one on the same worker can only end after it, whatever the machine's speed. `storing`: the
    slow unit is held while its outputs are stored (after its render's turn), as on a slow store."""

    def logged() -> int:
        return sum(len(path.read_text().splitlines()) for path in Path(log_dir).glob("*.jsonl"))

    def hold(item) -> None:
        if item.width == slow_width:
            deadline = time.monotonic() + bound
            while logged() < wait_for and time.monotonic() < deadline:
                time.sleep(0.05)

    class TimedWorker(RenderWorker):
        def _write(self, item, output):
            if storing:
                hold(item)
            return super()._write(item, output)

        def render(self, unit):
            start = time.time()
            if not storing:
                hold(unit.items[0])
            result = super().render(unit)
            record = {
                "pid": os.getpid(),
                "ids": [i.id for i in unit.items],
                "start": start,
                "end": time.time(),
            }
            with open(Path(log_dir) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            return result

    return TimedWorker


def poison_when_all_render(marker_dir: Path, replicas: int) -> type:
    """A PoisonWorker whose renders wait until `replicas` workers have each been handed a unit:
    the driver then knows every replica as ready before any row finishes, whatever the machine's
    speed (the wait is bounded, so a replica that never starts fails the test, not hangs it)."""

    class PoisonWhenAllRender(PoisonWorker):
        def render(self, unit):
            (Path(marker_dir) / f"rendering-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while len(list(Path(marker_dir).glob("rendering-*"))) < replicas and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().render(unit)

    return PoisonWhenAllRender


def failing_setup(marker_dir: Path, error: BaseException) -> type:
    """A worker whose setup raises `error` every time; each try leaves a file in `marker_dir`."""

    class FailingSetup(RenderWorker):
        def _setup(self, address):
            (Path(marker_dir) / f"setup-{os.getpid()}").touch()
            raise error

    return FailingSetup


def choosing_differently(marker_dir: Path, other: str) -> type:
    """A worker that, given --attention-backend auto, chooses `other` unless it is the first to
    start its setup (as a worker on a node with another GPU or packages would); each setup leaves
    a file in `marker_dir` named after the backend it was given, each unit one named after the
    backend it renders with. Each worker's first unit waits (bounded) until the driver has
    started the other worker again with the job's choice (a setup given something other than
    auto), so that the job still has rows when the other worker's choice arrives, however fast
    the first renders and however late the driver hears of the other's setup."""

    def restarted(folder) -> bool:
        return any(not p.name.startswith("setup-auto-") for p in Path(folder).glob("setup-*"))

    class ChoosingDifferently(RenderWorker):
        def _setup(self, address):
            given = self.settings.attention_backend
            try:  # atomic: exactly one worker is the first
                os.close(os.open(Path(marker_dir) / "first", os.O_CREAT | os.O_EXCL))
                self.first = True
            except FileExistsError:
                self.first = False
            (Path(marker_dir) / f"setup-{given}-{os.getpid()}").touch()
            if given == "auto" and not self.first:
                self.settings = replace(self.settings, attention_backend=other)
            info = super()._setup(address)
            self.chosen = info.attention_backend
            return info

        def render(self, unit):
            # Whichever worker renders first (the one whose choice is the job's, first to start
            # its setup or not) waits for the other's restart.
            if not getattr(self, "waited", False):
                self.waited = True
                deadline = time.monotonic() + 300  # a bound, not a pace
                while not restarted(marker_dir) and time.monotonic() < deadline:
                    time.sleep(0.1)
            (Path(marker_dir) / f"render-{self.chosen}-{unit.unit_id}").touch()
            return super().render(unit)

    return ChoosingDifferently


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def out_of_memory(log_file: Path, once: str, always: str) -> type:
    """A worker whose transformer runs out of memory for `once` unless VAE tiling is on (as a
    memory-saving retry would fix), and for `always` whatever the settings. Every transformer
    call is logged as a JSON line {id, tiling, oom}."""
    import torch

    class OutOfMemory(RenderWorker):
        def render_pixels(self, unit, prepared):
            ids = [item.id for item in unit.items]

            def check(module, args, kwargs):
                tiling = bool(self.pipe.vae.use_tiling)
                oom = always in ids or (once in ids and not tiling)
                with open(log_file, "a") as f:
                    f.write(json.dumps({"ids": ids, "tiling": tiling, "oom": oom}) + "\n")
                if oom:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

            hook = self.pipe.transformer.register_forward_pre_hook(check, with_kwargs=True)
            try:
                return super().render_pixels(unit, prepared)
            finally:
                hook.remove()

    return OutOfMemory
