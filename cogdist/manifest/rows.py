"""Turning validated manifest rows into WorkItems, every default resolved."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from cogdist.models.registry import ModelSpec
from cogdist.sink.naming import output_path
from cogdist.work import WorkItem, derive_seed


def _given(row: dict, name: str, default):
    value = row.get(name)
    return default if value is None else value


def work_items(batch: pa.RecordBatch, spec: ModelSpec, extension: str) -> Iterator[tuple[WorkItem, dict]]:
    """(item, manifest row) for every row of `batch`; the row is kept for the index."""
    for row in batch.to_pylist():
        item_id = row["id"]
        yield (
            WorkItem(
                id=item_id,
                prompt=row["prompt"],
                negative_prompt=row.get("negative_prompt"),
                seed=int(_given(row, "seed", derive_seed(item_id))),
                width=int(_given(row, "width", spec.width)),
                height=int(_given(row, "height", spec.height)),
                num_inference_steps=int(_given(row, "num_inference_steps", spec.num_inference_steps)),
                guidance_scale=float(_given(row, "guidance_scale", spec.guidance_scale)),
                num_frames=row.get("num_frames") if spec.kind == "video" else None,
                output=output_path(item_id, extension),
            ),
            row,
        )
