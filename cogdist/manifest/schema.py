"""The manifest's vocabulary: the columns cogdist reads, their kinds, and the names it reserves."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from cogdist.errors import ManifestProblem
from cogdist.sink.ledger import RESULT_FIELDS

STRING, INTEGER, NUMBER = "string", "integer", "number"

# name -> kind of the manifest columns cogdist reads; any other column is carried into the index.
COLUMNS: dict[str, str] = {
    "id": STRING,
    "prompt": STRING,
    "negative_prompt": STRING,
    "seed": INTEGER,
    "width": INTEGER,
    "height": INTEGER,
    "num_frames": INTEGER,
    "num_inference_steps": INTEGER,
    "guidance_scale": NUMBER,
    "image": STRING,
    "video": STRING,
    "strength": NUMBER,
    "fps": NUMBER,
    "lora": STRING,  # one of the job's --lora adapters by name; empty: the base model
}
REQUIRED = ("id", "prompt")
CONDITIONING = ("image", "video", "strength")

# Columns cogdist adds to the index (cogdist.sink.ledger) that are not manifest columns of its
# own: a manifest column of that name would be ambiguous.
RESERVED = tuple(field.name for field in RESULT_FIELDS if field.name not in COLUMNS)

KIND_CHECK: dict[str, Callable[[pa.DataType], bool]] = {
    STRING: lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t),
    INTEGER: lambda t: pa.types.is_integer(t) or pa.types.is_null(t),
    NUMBER: lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t),
}


NULL_AS = {STRING: pa.string(), INTEGER: pa.int64(), NUMBER: pa.float64()}


def check_schema(schema: pa.Schema) -> list[ManifestProblem]:
    problems = []
    for name in REQUIRED:
        if name not in schema.names:
            problems.append(
                ManifestProblem(
                    f"required column is missing (columns: {', '.join(schema.names)})", column=name
                )
            )
    for field in schema:
        kind = COLUMNS.get(field.name)
        if kind is not None and not KIND_CHECK[kind](field.type):
            problems.append(ManifestProblem(f"has type {field.type}; expected {kind}", column=field.name))
        if field.name in RESERVED:
            problems.append(
                ManifestProblem(
                    "is a name cogdist writes into the index; rename this column", column=field.name
                )
            )
    # Columns are read and carried into the index by name: a repeated name is ambiguous.
    for name in dict.fromkeys(schema.names):
        if len(schema.get_all_field_indices(name)) > 1:
            problems.append(ManifestProblem("appears more than once", column=name))
    return problems
