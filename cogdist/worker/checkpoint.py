"""Step checkpoints: the denoising state of a long render, saved to OUT and resumed after a kill.

A CogVideoX 1.5 video at 161 frames denoises for minutes even on several GPUs; a preempted
worker should not start it over. Every N steps (or every CHECKPOINT_SECONDS) the state after the
scheduler's step goes to `OUT/_cogdist/checkpoints/<output>.pt`, one file per row:

- the step index (steps done);
- the scheduler step's outputs for the row (the latents, and the DPM solver's previous x0 estimate,
  which the stock pipeline keeps in a loop variable);
- the scheduler's own attributes, and the row's CPU generator state (the DPM solver draws noise
  at every step).

The stock pipeline still runs the loop. A resumed call fast-forwards through the steps already
done: the transformer returns zeros without computing, the scheduler step returns the saved
outputs, and at the last saved step the scheduler and generators get their saved state back.
From there every step computes exactly what the uninterrupted call did, so the output is the
same, bit for bit on the same hardware. A checkpoint names the row's full settings and is
ignored when they differ; it is removed once the row's output is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cogdist.errors import StorageError, UsageError
from cogdist.patching import replaced
from cogdist.storage import Location
from cogdist.work import WorkItem

CHECKPOINTS = "_cogdist/checkpoints"
CHECKPOINT_SECONDS = 300.0
"""Without --step-checkpoint, an item's state is saved after every this many seconds of denoising."""
FORMAT = 1


def check_step_checkpoint(spec, step_checkpoint: int | None, *, cached: bool) -> None:
    """Refuse a --step-checkpoint that `spec` (a ModelSpec) cannot take, or that a step cache
    (`cached`) would make wrong."""
    if step_checkpoint is None:
        return
    if step_checkpoint < 0:
        raise UsageError(f"--step-checkpoint must be >= 0 steps, got {step_checkpoint}")
    if step_checkpoint and spec.kind != "video":
        raise UsageError(
            f"--step-checkpoint: {spec.name} renders an image in one short call; "
            "step checkpoints are for video models"
        )
    if step_checkpoint and cached:
        # Tested: a resumed row restarts the cache's state and differs from an uninterrupted one.
        raise UsageError(
            "--step-checkpoint: a render resumed from a step checkpoint starts the step cache over, "
            "so its output would differ from an uninterrupted one: with --cache, step checkpoints "
            "are off (drop --step-checkpoint or --cache)"
        )


def checkpoint_path(item: WorkItem) -> str:
    return f"{CHECKPOINTS}/{item.output}.pt"


def _signature(item: WorkItem) -> str:
    """Everything about the row that shapes its denoising; a checkpoint of other settings is stale."""
    fields = {**vars(item)}
    fields.pop("output")
    fields.pop("fps")
    fields.pop("frames_dir")
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()


@dataclass
class StepCheckpoints:
    """Saves and resumes the denoising state of the rows of one pipeline call (see module doc)."""

    out: Location
    every_steps: int | None = None
    """Save after every this many steps; None: after every `every_seconds` of denoising."""
    every_seconds: float = CHECKPOINT_SECONDS
    writer: bool = True
    """In a gang, rank 0 saves; every rank resumes."""
    resumed: list[tuple[str, int]] = field(default_factory=list)
    """(row id, step) of every resume, for tests and logs."""
    stored: set[str] = field(default_factory=set)
    """Checkpoint paths this worker wrote or found, the only ones `remove` has to delete."""

    @contextlib.contextmanager
    def around(self, pipe, items: Sequence[WorkItem], generators: Sequence) -> Iterator[None]:
        """Checkpoint (and resume) the stock pipeline call made inside this block for `items`,
        whose per-row CPU generators are `generators` (in the order of the batch)."""
        import torch

        saved = self._load(items)
        resume_at = saved["step"] if saved else 0
        if saved:
            for item in items:
                self.resumed.append((item.id, resume_at))
            print(
                f"cogdist worker: resuming {', '.join(i.id for i in items)} from step {resume_at}",
                file=sys.stderr,
                flush=True,
            )
        scheduler, transformer = pipe.scheduler, pipe.transformer
        real_step = scheduler.step
        steps = 0
        last_save = time.monotonic()

        @functools.wraps(real_step)  # the pipeline inspects its signature for eta/generator
        def step(*args, **kwargs):
            nonlocal steps, last_save
            steps += 1
            if steps <= resume_at:  # a step done before the kill
                if steps == resume_at:
                    _restore(scheduler, saved["scheduler"])
                    for generator, state in zip(generators, saved["generators"]):
                        generator.set_state(state)
                device = args[0].device  # the model output's
                return tuple(None if t is None else t.to(device) for t in saved["outputs"])
            outputs = real_step(*args, **kwargs)
            due = (
                steps % self.every_steps == 0
                if self.every_steps
                else time.monotonic() - last_save >= self.every_seconds
            )
            if self.writer and due:
                self._save(items, steps, outputs, scheduler, generators)
                last_save = time.monotonic()
            return outputs

        real_forward = transformer.forward

        def forward(*args, **kwargs):
            if steps < resume_at:  # its output would only feed a step that is skipped
                hidden = kwargs["hidden_states"]
                shape = list(hidden.shape)
                shape[2] = transformer.config.out_channels
                return (torch.zeros(shape, dtype=hidden.dtype, device=hidden.device),)
            return real_forward(*args, **kwargs)

        # diffusers' hooks set a forward on the instance; cogdist.metrics wraps step around this.
        with replaced(scheduler, "step", step), replaced(transformer, "forward", forward):
            yield

    def remove(self, items: Sequence[WorkItem]) -> None:
        """Forget the checkpoints of rows whose outputs are written."""
        if not self.writer:
            return
        for item in items:
            if checkpoint_path(item) not in self.stored:
                continue  # most items: none was ever saved, and a delete is one request on S3
            try:
                self.out.delete(checkpoint_path(item))
                self.stored.discard(checkpoint_path(item))
            except StorageError as e:  # a stale checkpoint is ignored or overwritten later
                print(f"cogdist worker: could not remove a checkpoint: {e}", file=sys.stderr, flush=True)

    def _save(self, items, steps: int, outputs, scheduler, generators) -> None:
        import torch

        state = _scheduler_state(scheduler)
        for j, item in enumerate(items):
            payload = {
                "format": FORMAT,
                "signature": _signature(item),
                "step": steps,
                "outputs": [None if t is None else t[j : j + 1].detach().cpu() for t in outputs],
                "scheduler": state,
                "generator": generators[j].get_state(),
            }
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            self.out.write_bytes(checkpoint_path(item), buffer.getvalue())
            self.stored.add(checkpoint_path(item))

    def _load(self, items: Sequence[WorkItem]) -> dict | None:
        """The rows' saved state, joined into the batch; None unless every row has one of the same
        step and settings (a batch resumes together or starts over)."""
        import torch

        found = [self.out.exists(checkpoint_path(item)) for item in items]
        self.stored.update(checkpoint_path(item) for item, there in zip(items, found) if there)
        if not all(found):
            return None
        payloads = []
        for item in items:
            try:
                data = self.out.read_bytes(checkpoint_path(item))
                payload = torch.load(io.BytesIO(data), weights_only=True)  # never unpickles code
            except Exception as e:  # a damaged checkpoint only costs the steps it saved
                print(f"cogdist worker: ignoring checkpoint of {item.id}: {e}", file=sys.stderr, flush=True)
                return None
            if payload.get("format") != FORMAT or payload.get("signature") != _signature(item):
                return None
            payloads.append(payload)
        if len({p["step"] for p in payloads}) != 1:
            return None
        first = payloads[0]
        outputs = [
            None if first["outputs"][k] is None else torch.cat([p["outputs"][k] for p in payloads])
            for k in range(len(first["outputs"]))
        ]
        return {
            "step": first["step"],
            "outputs": outputs,
            "scheduler": first["scheduler"],
            "generators": [p["generator"] for p in payloads],
        }


def _scheduler_state(scheduler) -> dict:
    """The scheduler's attributes that plain data can hold (its config is not among them)."""
    import torch

    def plain(value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    return {
        name: value.detach().cpu() if isinstance(value, torch.Tensor) else value
        for name, value in vars(scheduler).items()
        if name not in ("_internal_dict", "step") and plain(value)
    }


def _restore(scheduler, state: dict) -> None:
    import torch

    for name, value in state.items():
        current = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor):
            value = value.to(current.device)
        setattr(scheduler, name, value)
