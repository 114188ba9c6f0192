"""The worker: one per GPU (or CPU slot). Loads the pipeline once, renders units, writes outputs.

It makes no scheduling decisions: every setting of a row arrives resolved in its WorkItem, the
output name included. It returns only small metadata; the driver alone commits the index. A row
whose conditioning input cannot be read fails alone; the rest of its unit renders.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cogdist.errors import ConfigurationError, GangBroken
from cogdist.failures import broken_collective, configuration_problem
from cogdist.metrics import timing_steps
from cogdist.models.registry import ModelSpec
from cogdist.sink.encode import Encoded, encode_output
from cogdist.storage import open_location
from cogdist.work import ItemResult, UnitResult, WorkItem, WorkUnit
from cogdist.worker.cache import apply_step_cache, reset_step_cache
from cogdist.worker.checkpoint import StepCheckpoints
from cogdist.worker.compile import CompileClock, compile_transformer
from cogdist.worker.inputs import InputError, load_inputs
from cogdist.worker.offload import place, saving_memory
from cogdist.worker.overlap import OutputBuffer, Turnstile
from cogdist.worker.quantize import NONE as QUANTIZE_NONE
from cogdist.worker.quantize import quantize_pipeline
from cogdist.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from cogdist.parallel.group import GangGroup

WRITERS = 64
"""Outputs encoded and stored at once, over every unit in flight: uploads mostly wait on the store,
so a distant one needs many at once to keep up with the renders (the output buffer bounds their
bytes). Through a store 0.3 s away a write takes ~1 s: 16 writers held a worker to ~11 rows a
second."""


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    pid: int
    node: str
    """The Ray node id (the host name outside Ray)."""
    device: str
    dtype: str
    load_seconds: float
    attention_backend: str = "native"
    """The attention backend it renders with (`--attention-backend auto` resolved)."""


@dataclass
class Prepared:
    """A unit's rows as read before their turn."""

    inputs: dict[str, object] = field(default_factory=dict)
    """Decoded conditioning inputs of each readable row, by id."""
    failed: dict[str, ItemResult] = field(default_factory=dict)
    """Rows whose inputs could not be read."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Each row's reading time."""


@dataclass(frozen=True)
class Rendered:
    """A unit's turn: its rendered rows' pixels, on the host."""

    items: list[WorkItem] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    """The pipeline call, compiling apart."""
    compile_seconds: float = 0.0
    step_seconds: tuple[float, ...] = ()


class RenderWorker:
    """One rank's renderer: `setup` loads its family's pipeline through the family's runner
    (cogdist.models.spec.FamilyRunner) and applies the gang's parallelism; `render` renders a
    unit and writes its outputs (rank 0 of a gang)."""

    def __init__(
        self, spec: ModelSpec, out_uri: str, settings: WorkerSettings, rank: int = 0, world_size: int = 1
    ):
        self.spec = spec
        self.out_uri = out_uri
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.pipe = None
        self.gang: GangGroup | None = None
        self.node = node_id()
        self.broken: str | None = None
        """Why the gang's collectives failed, once they have: it takes no more units."""
        self.turnstile = Turnstile()
        self.buffer = OutputBuffer()
        self.writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="cogdist-write")
        # Every render on one thread, whichever actor thread took its call: torch's OpenMP team
        # and its thread count belong to the thread that calls it (under Ray's OMP_NUM_THREADS,
        # a render on a fresh thread ran on one core while set_num_threads said two).
        self.renderer = ThreadPoolExecutor(
            1, thread_name_prefix="cogdist-render", initializer=self._init_renderer
        )

    def _init_renderer(self) -> None:
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: where the gang's process group meets (an address and free port of this node)."""
        from cogdist.parallel.group import rendezvous_address

        return rendezvous_address()

    def setup(self, address: tuple[str, int] | None = None) -> WorkerInfo:
        """Join the gang, load the pipeline and apply the gang's parallelism.

        Called once, after Ray has set the visible GPUs. The group forms before loading, so that a
        missing peer fails within the init timeout instead of after minutes of loading. A failure
        that no rebuild can fix (cogdist.failures.configuration_problem) is a ConfigurationError.
        """
        try:
            return self._setup(address)
        except Exception as e:
            if configuration_problem(e):
                raise ConfigurationError(f"rank {self.rank}: {type(e).__name__}: {e}") from e
            raise

    def _setup(self, address: tuple[str, int] | None) -> WorkerInfo:
        import diffusers
        import torch
        import transformers

        from cogdist.models.registry import family
        from cogdist.parallel.attention import apply_attention_backend
        from cogdist.parallel.broadcast import drop_first_rank_models
        from cogdist.parallel.group import Layout, init_gang
        from cogdist.parallel.pipeline import parallelize

        start = time.perf_counter()
        # Library warnings would repeat once per worker in the driver's log; errors still show.
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        layout = Layout(sp=self.settings.sp, cfg=2 if self.settings.cfg_parallel else 1)
        if layout.world_size != self.world_size:
            raise ValueError(f"a gang of {self.world_size} cannot hold {layout}")
        if layout.world_size > 1:
            if address is None:
                raise ValueError(
                    f"rank {self.rank} of a gang of {self.world_size} needs rank 0's rendezvous address"
                )
            self.gang = init_gang(
                layout, self.rank, address, self.device, collective_timeout=self.settings.collective_timeout
            )
        name = self.settings.dtype
        if name == "auto":
            name = self.spec.dtype_gpu if self.device.type == "cuda" else self.spec.dtype_cpu
        self.family = family(self.spec.family)
        self.runner = self.family.load_runner()
        pipe = self.runner.load(self.spec, getattr(torch, name))
        # Before quantizing: fused adapters are merged into full-precision weights.
        self.adapters = None
        if self.settings.lora:
            from cogdist.worker.lora import LoadedAdapters

            self.adapters = LoadedAdapters(
                pipe, self.settings.lora, self.settings.fuse_lora, self.settings.storage_timeout
            )
        drop_first_rank_models(pipe, self.gang, self.family.first_rank_models)
        if (self.settings.quantize, self.settings.quantize_text_encoder) != (QUANTIZE_NONE, QUANTIZE_NONE):
            quantize_pipeline(pipe, self.device, self.settings.quantize, self.settings.quantize_text_encoder)
        self.pipe = place(pipe, self.device, self.settings)
        # Before the parallelism, so that the cache's hooks see their own rank's tokens.
        apply_step_cache(self.pipe, self.settings.cache, self.settings.cache_threshold)
        if self.gang is not None:
            parallelize(self.pipe, self.gang, self.family.cfg_parallel)
        # After the parallelism: under --sp, diffusers refuses a backend without context parallelism.
        attention = apply_attention_backend(self.pipe.transformer, self.settings.attention_backend, layout.sp)
        # Last: the compiled blocks hold every hook the steps above put on them.
        self.compile_clock = None
        if self.settings.compile:
            if layout.sp > 1:
                from cogdist.parallel.sequence import context_parallel_attention_eager

                context_parallel_attention_eager()
            compile_transformer(self.pipe.transformer)
            self.compile_clock = CompileClock()
        # pyarrow's S3 client opens at most as many connections as its IO threads (8 by default),
        # which held a worker's uploads to 8 at a time; it reads the count when a client is made.
        pa.set_io_thread_count(max(pa.io_thread_count(), WRITERS))
        self.out = open_location(self.out_uri, self.settings.storage_timeout)
        self.checkpoints = None
        if self.family.step_checkpoints and self.settings.step_checkpoint != 0:
            self.checkpoints = StepCheckpoints(
                self.out,
                every_steps=self.settings.step_checkpoint,
                writer=self.gang is None or self.gang.is_writer,
            )
        return WorkerInfo(
            rank=self.rank,
            pid=os.getpid(),
            node=self.node,
            device=str(self.device),
            dtype=name,
            load_seconds=time.perf_counter() - start,
            attention_backend=attention,
        )

    def render(self, unit: WorkUnit) -> UnitResult:
        """Render a unit and store its outputs; in a gang every rank calls this with the same unit,
        rank 0 stores. Returns once every output is stored (a row is finished only then).

        The actor is threaded (cogdist.worker.overlap): the unit's inputs are read as soon as the
        call arrives, its render waits for its turn, and its outputs are encoded and stored while
        the next unit renders.
        """
        start = time.perf_counter()
        problem: BaseException | None = None
        try:
            prepared = self._read_inputs(unit)
        except BaseException as e:  # raised in its turn: the turns after it must not wait forever
            prepared, problem = Prepared(), e
        queued = time.perf_counter()
        with self.turnstile.turn(unit.turn):
            start += time.perf_counter() - queued  # its wait for its turn is no time of its own
            if problem is not None:
                raise problem
            rendered = self.renderer.submit(self._render_in_gang, unit, prepared).result()
            if self.gang is not None and not self.gang.is_writer:  # rank 0 stores; the rest return
                return UnitResult(unit.unit_id, (), time.perf_counter() - start, rendered.step_seconds)
            outputs: list[np.ndarray | Encoded] = list(rendered.outputs)
            if self.device.type == "cpu":
                # The encoders would take the cores the next render denoises on, and its threads
                # wait for the slowest: encode in the turn, as a plain loop does. A GPU's host
                # encodes while the device renders; uploads wait on the network either way.
                outputs = [self._encode(item, pixels) for item, pixels in zip(rendered.items, outputs)]
            held = sum(output.nbytes for output in outputs)
            self.buffer.hold(held)  # a slow store holds the next render back here
        results = dict(prepared.failed)
        try:
            written = list(self.writers.map(self._write, rendered.items, outputs))
        finally:
            self.buffer.release(held)
        if self.checkpoints is not None:
            self.checkpoints.remove(rendered.items)
        count = len(rendered.items)
        for result, seconds in written:
            if result.ok:
                result = replace(
                    result,
                    render_seconds=rendered.seconds / count,
                    compile_seconds=rendered.compile_seconds / count,
                    io_seconds=prepared.seconds.get(result.id, 0.0) + seconds,
                )
            results[result.id] = result
        return UnitResult(
            unit.unit_id,
            tuple(results[i.id] for i in unit.items),
            time.perf_counter() - start,
            rendered.step_seconds,
        )

    def _render_in_gang(self, unit: WorkUnit, prepared: Prepared) -> Rendered:
        """`render_pixels`; in a gang, a collective that failed means a peer is gone or stuck: the
        gang, not the row, and every unit queued behind it is refused at once (its peers would wait
        in a collective that never completes)."""
        if self.gang is None:
            return self.render_pixels(unit, prepared)
        if self.broken is not None:
            raise GangBroken(f"rank {self.rank}: an earlier unit broke the gang: {self.broken}")
        try:
            return self.render_pixels(unit, prepared)
        except Exception as e:
            import torch.distributed as dist

            if broken_collective(e, (dist.DistError,)):
                self.broken = f"{type(e).__name__}: {e}"
                raise GangBroken(f"rank {self.rank}: {self.broken}") from e
            raise

    def _read_inputs(self, unit: WorkUnit) -> Prepared:
        """Every row's decoded and fitted conditioning inputs; a row whose input cannot be read
        fails alone."""
        prepared = Prepared()
        for item in unit.items:
            started = time.perf_counter()
            try:
                inputs = self._load(item)
                # The family's own checks and fitting of decoded inputs.
                prepared.inputs[item.id] = self.runner.prepare_inputs(item, inputs)
            except InputError as e:
                prepared.failed[item.id] = ItemResult(item.id, ok=False, error=str(e))
            prepared.seconds[item.id] = time.perf_counter() - started
        return prepared

    def render_pixels(self, unit: WorkUnit, prepared: Prepared) -> Rendered:
        """The unit's turn: its readable rows rendered in one pipeline call, to pixels on the host."""
        if self.gang is not None:
            # Every rank must render the same rows: a row whose input failed on any rank (a
            # transient read error on one node) fails on all of them, and is retried.
            from cogdist.parallel.broadcast import failed_on_any_rank

            for item, failed in zip(
                unit.items, failed_on_any_rank(self.gang, [i.id in prepared.failed for i in unit.items])
            ):
                if failed and item.id not in prepared.failed:
                    del prepared.inputs[item.id]
                    error = "its input could not be read on another rank of the gang (see that worker's log)"
                    prepared.failed[item.id] = ItemResult(item.id, ok=False, error=error)
        ready = [item for item in unit.items if item.id in prepared.inputs]
        if not ready:
            return Rendered()
        start = time.perf_counter()
        step_seconds: list[float] = []
        if self.adapters is not None:
            self.adapters.activate(ready[0].adapters)  # a unit's rows share their adapters
        if self.compile_clock is not None:
            self.compile_clock.before_unit((ready[0].shape, len(ready)))
            compiled_before = self.compile_clock.seconds
        with timing_steps(self.pipe.scheduler, step_seconds):
            outputs = self._render_saving_memory_on_oom(ready, [prepared.inputs[i.id] for i in ready])
        compile_seconds = 0.0
        if self.compile_clock is not None:
            compile_seconds = self.compile_clock.seconds - compiled_before
        return Rendered(
            ready,
            list(outputs),
            time.perf_counter() - start - compile_seconds,
            compile_seconds,
            tuple(step_seconds),
        )

    def _render_saving_memory_on_oom(self, items: list[WorkItem], inputs: list) -> list[np.ndarray]:
        """The family's render; after running out of memory, once more row by row with every
        memory-saving setting on (VAE tiling and slicing, model CPU offload on a GPU).

        A gang does not retry here: its other ranks are waiting in a collective of the failed call,
        so the error goes to the scheduler, which retries the row as a failure of its own.
        """
        import torch

        render = functools.partial(self.runner.render, gang=self.gang, checkpoints=self.checkpoints)
        if self.settings.prior_batch > 1:  # only a family with an AR prior is given one (ModelSpec.ar_prior)
            render = functools.partial(render, prior_batch=self.settings.prior_batch)
        reset_step_cache(self.pipe)  # a call that failed midway leaves the cache's state behind
        try:
            return render(self.pipe, items, self.device, inputs)
        except torch.OutOfMemoryError as e:
            if self.gang is not None:
                raise
            error = str(e).splitlines()[0][:200]
        print(
            f"cogdist worker {os.getpid()}: out of memory on {', '.join(i.id for i in items)} ({error}); "
            "retrying row by row with VAE tiling, slicing and (where no --offload is set) model CPU offload",
            file=sys.stderr,
            flush=True,
        )
        reset_step_cache(self.pipe)
        with saving_memory(self.pipe, self.device, self.settings):
            return [
                render(self.pipe, [item], self.device, [row_inputs])[0]
                for item, row_inputs in zip(items, inputs)
            ]

    def _load(self, item: WorkItem):
        """A row's decoded conditioning inputs (InputError when they cannot be read)."""
        return load_inputs(item, self.settings.storage_timeout)

    def _encode(self, item: WorkItem, pixels: np.ndarray) -> Encoded:
        return encode_output(item, pixels, self.settings.format, self.settings.quality)

    def _write(self, item: WorkItem, output: np.ndarray | Encoded) -> tuple[ItemResult, float]:
        """Store a row's output (encoded first if it is still pixels): frames first, the indexed
        file last; with the seconds its encoding and storing took.

        A write that still fails after `storage_timeout` of retries raises StorageError: OUT is
        unreachable, which is no row's fault, and the driver stops the run (a re-run resumes).
        """
        start = time.perf_counter()
        encoded = output if isinstance(output, Encoded) else self._encode(item, output)
        for path, png in encoded.frames:
            self.out.write_bytes(path, png)
        if not self.settings.return_outputs:
            self.out.write_bytes(item.output, encoded.data)
        result = ItemResult(
            item.id,
            ok=True,
            bytes_written=len(encoded.data),
            frames=encoded.frame_count,
            sha256=hashlib.sha256(encoded.data).hexdigest(),
            node=self.node,
            data=encoded.data if self.settings.return_outputs else None,
        )
        seconds = time.perf_counter() - start
        return result, seconds if encoded is not output else encoded.seconds + seconds


def node_id() -> str:
    """This process's Ray node id; the host name where it runs without Ray."""
    try:
        import ray
    except ImportError:  # no Ray here (a lent GPU machine)
        return os.uname().nodename
    # Outside Ray (an in-process worker), asking for the runtime context would start a Ray instance.
    if not ray.is_initialized():
        return os.uname().nodename
    return ray.get_runtime_context().get_node_id()
