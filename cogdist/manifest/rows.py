"""Turning validated manifest rows into WorkItems, every default resolved."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pyarrow as pa

from cogdist.models.registry import DEFAULT_STRENGTH, VIDEO_TO_VIDEO, ModelSpec
from cogdist.sink.naming import frames_folder, output_path
from cogdist.storage import input_uri
from cogdist.work import WorkItem, derive_seed, sample_id, sample_seed


@dataclass(frozen=True)
class RowDefaults:
    """How a job fills what a row leaves empty, beyond the model's own defaults."""

    extension: str
    """Output file extension (png, jpg, webp, mp4)."""
    save_frames: bool = False
    """Video rows also get a folder of PNG frames."""
    adapters: tuple[tuple[str, float, str], ...] = ()
    """The job's LoRA adapters, (name, scale, sha256) each: every row's, or (a manifest with a
    `lora` column) those its rows name."""
    samples: int = 1
    """Outputs per manifest row (--samples): sample 0 is the row itself, see `sample_of`."""


def _given(row: dict, name: str, default):
    value = row.get(name)
    return default if value is None else value


def _present(row: dict, name: str) -> str | None:
    value = row.get(name)
    return value if value else None


def work_items(
    batch: pa.RecordBatch, spec: ModelSpec, defaults: RowDefaults
) -> Iterator[tuple[WorkItem, dict]]:
    """(item, manifest row) for every row of `batch`; the row is kept for the index."""
    video_model = spec.kind == "video"
    per_row = "lora" in batch.schema.names
    adapters = {use[0]: (use,) for use in defaults.adapters}
    for row in batch.to_pylist():
        item_id = row["id"]
        image, video = _present(row, "image"), _present(row, "video")
        task = spec.task_for(image is not None, video is not None)
        if task is None:  # validate_manifest refuses such rows before any is read here
            raise ValueError(f"row {item_id!r} has inputs {spec.name} has no task for")
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
                num_frames=int(_given(row, "num_frames", spec.num_frames)) if video_model else None,
                output=output_path(item_id, defaults.extension),
                task=task,
                image=input_uri(image) if image else None,
                video=input_uri(video) if video else None,
                strength=float(_given(row, "strength", DEFAULT_STRENGTH)) if task == VIDEO_TO_VIDEO else None,
                fps=float(_given(row, "fps", spec.fps)) if video_model else None,
                frames_dir=frames_folder(item_id) if video_model and defaults.save_frames else None,
                adapters=adapters.get(row["lora"] or "", ()) if per_row else defaults.adapters,
            ),
            row,
        )


def sample_of(item: WorkItem, sample: int, defaults: RowDefaults) -> WorkItem:
    """Sample `sample` of a row's item: a row of its own with its own id, seed and output names
    (`cogdist.work.sample_id`, `sample_seed`); sample 0 is the item itself."""
    if sample == 0:
        return item
    new_id = sample_id(item.id, sample)
    return replace(
        item,
        id=new_id,
        seed=sample_seed(item.seed, sample),
        output=output_path(new_id, defaults.extension),
        frames_dir=frames_folder(new_id) if item.frames_dir else None,
        sample_index=sample,
        source_id=item.id,
    )
