"""WorkerSettings: what every worker of a job receives, derived from the option declarations.

The fields are the RenderOptions declared for workers (`Option.worker` in cogdist.options), so a
new worker option is declared once, there; this module only turns the declarations into the
frozen record the driver sends to every actor.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any

from cogdist.options import declared


def _worker_fields() -> list[tuple[str, str, Any]]:
    """WorkerSettings' fields: every option declared for workers (same name; an option whose None
    stands for the model's default arrives resolved), then two that are the driver's to set."""
    derived = []
    for name, annotation, default, how in declared():
        if not how.worker:
            continue
        if annotation == "bool | None":  # resolved to the model's default before workers start
            annotation, default = "bool", bool(default)
        elif how.worker_default is not None:
            annotation, default = annotation.replace(" | None", ""), how.worker_default
        derived.append((name, annotation, field(default=default, metadata={"help": how.help})))
    own = {
        "threads": ("int | None", None, "torch intra-op threads on a CPU worker; None: torch's default"),
        "return_outputs": (
            "bool",
            False,
            "return each encoded output to the driver (a dataset sink writes shards) instead of storing it",
        ),
    }
    derived += [(name, t, field(default=d, metadata={"help": h})) for name, (t, d, h) in own.items()]
    return derived


WorkerSettings = make_dataclass("WorkerSettings", _worker_fields(), frozen=True)
WorkerSettings.__module__ = __name__  # where pickle (Ray) finds it
WorkerSettings.__doc__ = """What every worker of a job is given, derived from the RenderOptions
declared for workers (`Option.worker`; same names, resolved values: `cogdist.engine.worker_settings`
fills them in) plus `threads` and `return_outputs`. Each field's metadata holds its help text."""
