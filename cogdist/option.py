"""How a render option is declared: an `Option` in the metadata of a RenderOptions field
(cogdist.options), which says how the CLI offers it and what it does to a job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from cogdist.errors import UsageError
from cogdist.models.spec import ModelSpec

# What an option does to a job (Option.kind).
OUTPUT = "output"
"""Changes the outputs: kept in the job record's "settings"; a resume with another value is refused."""
RECORDED = "recorded"
"""Kept in the job record's "recorded" for the reader, free to change on resume (replicas, timeouts)."""
UNRECORDED = "unrecorded"
"""Neither: paths and addresses (which may hold credentials) and what one run does (--overwrite)."""

# CLI argument groups, by Option.group; options without one are the command's own.
GROUPS = {
    "memory": "memory (default: the model's; see `cogdist models`)",
    "defaults": "defaults for rows that leave a column empty",
    "trust": "checkpoints you trust (off: safetensors only, no code from the checkpoint)",
    "manifest": "how the manifest's columns are read",
    "adapters": "LoRA adapters (README: LoRA)",
}
ROW_DEFAULTS = "defaults"


@dataclass(frozen=True)
class Option:
    """How one RenderOptions field is offered and what it does to a job."""

    help: str
    """The CLI's help line (argparse's %(default)s may stand for the default)."""
    kind: str = UNRECORDED
    """OUTPUT, RECORDED or UNRECORDED."""
    worker: bool = False
    """Every worker receives it (a WorkerSettings field of the same name, see `worker_values`)."""
    flag: str | None = None
    """The CLI's spelling; default "--" and the name with dashes; "" for a positional argument."""
    group: str | None = None
    """A key of GROUPS: the help section it is listed in."""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    spec_field: str | None = None
    """The ModelSpec field whose value None stands for (the model's default). The job record keeps
    the resolved value under this name; options of the ROW_DEFAULTS group also replace it in the
    ModelSpec the rows and workers receive."""
    record: Callable[[Any, ModelSpec], Any] | None = None
    """The job record's value, from the resolved value and the model (default: the value)."""
    aliases: dict[str, Any] | None = None
    """Other CLI flags that each set one value (`--cpu-offload` for `--offload model`)."""
    worker_default: Any = None
    """A worker option's WorkerSettings default where the option's own is None for "the model's"
    (a worker built by hand, as in a benchmark, gets this one); None: the option's default."""


def option(help: str, default: object = MISSING, **how: Any) -> Any:
    """A RenderOptions field declared with its Option."""
    return field(default=default, metadata={"option": Option(help, **how)})


def null_at(default: Any) -> Callable[[Any, ModelSpec], Any]:
    """An Option.record that keeps null at the option's default, so that a job record written
    before the option existed still resumes."""
    return lambda value, spec: None if value == default else value


def check_limits(at_least_one: dict[str, int], seconds: dict[str, float]) -> None:
    """Refuse a count below 1 or a duration that is not > 0 (flag -> value of each)."""
    for flag, value in at_least_one.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    for flag, value in seconds.items():  # an infinite interval would never commit
        if not value > 0 or (flag.endswith("-interval") and value == float("inf")):
            raise UsageError(f"{flag} must be > 0 seconds, got {value}")
