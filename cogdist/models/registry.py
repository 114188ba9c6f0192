"""Model presets and name resolution, read from the families' specs. Plain data: importing this
does not import torch.

A MODEL given by the user is one of:
- a preset name (`tiny-cogview4`, `THUDM/CogVideoX-5b`, ...) with known defaults and limits;
- a local folder holding `model_index.json` (for example a pipeline saved with
  `save_pretrained`), whose family, tasks and structural limits are read from its config files;
- any other Hugging Face repo id, whose config files are fetched (no weights) to do the same.

What a row asks for (its *task*) follows from the model and the row's input columns: a
text-to-video model renders rows with a `video` as video-to-video, an image-to-video model needs
an `image` on every row, and so on (`ModelSpec.task_for`). Each family declares itself in one
`FamilySpec` (cogdist.models.spec); this module only gathers them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace

from cogdist.errors import ModelError
from cogdist.models import cogvideox, cogview4, glm_image
from cogdist.models.spec import (
    CONTROL_TO_VIDEO,
    DEFAULT_STRENGTH,
    IMAGE_TO_IMAGE,
    IMAGE_TO_VIDEO,
    TASK_INPUT,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    FamilySpec,
    FrameRule,
    ModelSpec,
    SequencePlan,
    SizeRule,
    estimate_parameters,
)
from cogdist.models.trust import check_folder_index, check_index

__all__ = [
    "CONTROL_TO_VIDEO",
    "DEFAULT_STRENGTH",
    "FAMILIES",
    "IMAGE_TO_IMAGE",
    "IMAGE_TO_VIDEO",
    "PIPELINE_FAMILIES",
    "PRESETS",
    "SEQUENCE_PLANS",
    "TASK_INPUT",
    "TEXT_TO_IMAGE",
    "TEXT_TO_VIDEO",
    "TILED_DECODE_KINDS",
    "VIDEO_TO_VIDEO",
    "FrameRule",
    "ModelSpec",
    "SizeRule",
    "family",
    "resolve_model",
    "sequence_plan",
    "spec_from_index",
    "tiled_decode_kind",
    "with_defaults",
]

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec for spec in (cogview4.SPEC, cogvideox.SPEC, glm_image.SPEC)
}
"""Every family cogdist runs, by key (`ModelSpec.family`)."""

PRESETS: dict[str, ModelSpec] = {preset.name: preset for spec in FAMILIES.values() for preset in spec.presets}

PIPELINE_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    class_name: (spec.name, tasks)
    for spec in FAMILIES.values()
    for class_name, tasks in spec.index_classes.items()
}
"""model_index.json `_class_name` -> (family, tasks)."""

SEQUENCE_PLANS: dict[str, SequencePlan] = {
    class_name: plan for spec in FAMILIES.values() for class_name, plan in spec.sequence_plans.items()
}
"""Transformer class name -> the sequence-parallel plan its family declares."""

TILED_DECODE_KINDS: dict[str, str] = {
    class_name: kind for spec in FAMILIES.values() for class_name, kind in spec.vae_tiles.items()
}
"""VAE class name -> the distributed tiled decode its family declares."""


def family(name: str) -> FamilySpec:
    """The FamilySpec of a `ModelSpec.family` key."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; cogdist runs {', '.join(FAMILIES)}") from None


def sequence_plan(transformer_class: str) -> SequencePlan:
    """The sequence-parallel plan a family declares for this transformer class."""
    if transformer_class not in SEQUENCE_PLANS:
        raise ValueError(
            f"no sequence-parallel plan for {transformer_class}; cogdist has plans for {sorted(SEQUENCE_PLANS)}"
        )
    return SEQUENCE_PLANS[transformer_class]


def tiled_decode_kind(vae_class: str) -> str | None:
    """Which distributed tiled decode a family declares for this VAE class (None: none)."""
    return TILED_DECODE_KINDS.get(vae_class)


def resolve_model(name: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSpec:
    """Turn a MODEL argument into a ModelSpec, or raise ModelError saying what was tried.

    A checkpoint whose loading would import code that ships with it, or (a folder) unpickle its
    weights, is refused unless the matching opt-in is given; the spec carries the opt-ins to the
    workers, which check the files again before loading (`cogdist.models.trust`).
    """
    opt_ins = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if name in PRESETS:
        return replace(PRESETS[name], **opt_ins)
    folder = name[len("file://") :] if name.startswith("file://") else name
    if os.path.isdir(folder):
        folder = os.path.abspath(folder)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelError(f"model folder {folder} has no model_index.json (save one with save_pretrained)")

        def read_local(rel: str) -> dict:
            with open(os.path.join(folder, rel)) as f:
                return json.load(f)

        spec = spec_from_index(name, folder, read_local, trust_remote_code=trust_remote_code)
        check_folder_index(name, folder, **opt_ins)
        return replace(spec, **opt_ins)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return replace(
            spec_from_index(name, name, _hub_reader(name), trust_remote_code=trust_remote_code), **opt_ins
        )
    raise ModelError(
        f"unknown model {name!r}: not a preset (run `cogdist models`), not a folder with "
        "model_index.json, and not a Hugging Face repo id (owner/name)"
    )


def spec_from_index(
    name: str, source: str, read: Callable[[str], dict], *, trust_remote_code: bool = False
) -> ModelSpec:
    """The spec of a checkpoint that is not a preset, from its configs (`read(rel) -> dict`)."""
    try:
        index = read("model_index.json")
    except ModelError:
        raise
    except Exception as e:  # JSON or I/O trouble: say which file
        raise ModelError(f"cannot read model_index.json of {name}: {e}") from e
    check_index(name, index, trust_remote_code=trust_remote_code)
    class_name = index.get("_class_name", "")
    if class_name not in PIPELINE_FAMILIES:
        known = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ModelError(
            f"model {name} is a {class_name or 'pipeline of unknown class'}; cogdist runs {known}"
        )
    family_name, tasks = PIPELINE_FAMILIES[class_name]
    try:
        spec = FAMILIES[family_name].from_configs(name, source, tasks, read)
        return replace(spec, parameters=estimate_parameters(read("transformer/config.json")))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ModelError(f"cannot read the configs of {name}: {e}") from e


def _hub_reader(repo_id: str) -> Callable[[str], dict]:
    def read(rel: str) -> dict:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id, rel)
        except Exception as e:
            raise ModelError(
                f"cannot fetch {rel} of Hugging Face repo {repo_id!r}: {type(e).__name__}: {e}. "
                "Check the name, your network and HF_TOKEN, or pass a local folder."
            ) from e
        with open(path) as f:
            return json.load(f)

    return read


def with_defaults(spec: ModelSpec, **overrides: object) -> ModelSpec:
    """`spec` with job-level default overrides (None values ignored)."""
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})
