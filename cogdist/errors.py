"""Typed errors. Each says what is wrong and how to fix it; the CLI maps them to exit codes."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_REFUSED = 2  # bad manifest, bad arguments, conflicting resume: nothing was rendered
EXIT_PENDING = 3  # `cogdist status --check`: manifest rows are neither done nor failed
EXIT_INTERRUPTED = 130


class CogdistError(Exception):
    """Base of every error cogdist raises on purpose."""

    exit_code = EXIT_ROWS_FAILED


class UsageError(CogdistError):
    """An option or argument cannot be used as given."""

    exit_code = EXIT_REFUSED


class ModelError(CogdistError):
    """The model name cannot be resolved or its checkpoint cannot be loaded."""

    exit_code = EXIT_REFUSED


class ResumeConflictError(CogdistError):
    """OUT holds a job whose settings would make this run's outputs differ."""

    exit_code = EXIT_REFUSED


class StorageError(CogdistError):
    """Reading or writing OUT or an input URI failed."""


class GangError(CogdistError):
    """A gang of workers could not be started or kept alive."""


class ConfigurationError(GangError):
    """A worker's setup failed on something no rebuild can fix (a package that is not installed,
    a checkpoint it cannot load): the job stops at once instead of rebuilding forever."""

    exit_code = EXIT_REFUSED


class CapacityError(GangError):
    """The cluster did not offer what a gang needs within --capacity-timeout."""


class GangBroken(GangError):
    """A collective of a gang failed (a peer died, hung or left): the gang is rebuilt, its unit
    re-queued, and no row is blamed."""


@dataclass(frozen=True)
class ManifestProblem:
    """One reason a manifest is refused, located as precisely as it can be."""

    reason: str
    file: str | None = None
    row: int | None = None  # 0-based row number within `file`
    id: str | None = None
    column: str | None = None
    value: object = None
    source: str | None = None
    """The manifest's own name of `column`, where cogdist reads it under another (--column-map)."""

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.id is not None:
            where.append(f"id {self.id!r}")
        if self.column is not None and self.source is not None:
            where.append(f"column {self.source!r} (as {self.column})")
        elif self.column is not None:
            where.append(f"column {self.column!r}")
        head = ", ".join(where)
        value = "" if self.value is None else f" = {_short(self.value)}"
        return f"{head}{value}: {self.reason}" if head else self.reason


class ManifestError(CogdistError):
    """The manifest cannot be rendered; nothing was scheduled or written."""

    exit_code = EXIT_REFUSED

    def __init__(self, problems: list[ManifestProblem], total: int | None = None):
        self.problems = problems
        self.total = total if total is not None else len(problems)
        lines = [f"manifest refused: {self.total} problem{'s' if self.total != 1 else ''}"]
        lines += [f"  {p}" for p in problems]
        if self.total > len(problems):
            lines.append(f"  ... and {self.total - len(problems)} more")
        super().__init__("\n".join(lines))


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
