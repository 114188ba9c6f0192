"""Model presets and name resolution. Plain data: importing this does not import torch.

A MODEL given by the user is one of:
- a preset name (`tiny-cogview4`, `THUDM/CogView4-6B`, ...) with known defaults and limits;
- a local folder holding `model_index.json` (for example a pipeline saved with
  `save_pretrained`), whose family and structural limits are read from its config files;
- any other Hugging Face repo id, whose config files are fetched (no weights) to do the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cogdist.errors import ModelError


@dataclass(frozen=True)
class SizeRule:
    """Which output sizes a model takes."""

    multiple: int
    """Width and height must be multiples of this."""
    min_side: int
    max_side: int
    max_area: int | None = None
    """Upper bound on width * height, if the model has one."""

    def problem(self, width: int, height: int) -> str | None:
        """Why (width, height) is refused, or None when it is fine."""
        for name, side in (("width", width), ("height", height)):
            if side % self.multiple:
                return f"{name} {side} is not a multiple of {self.multiple}"
            if not self.min_side <= side <= self.max_side:
                return f"{name} {side} is outside {self.min_side}..{self.max_side}"
        if self.max_area is not None and width * height > self.max_area:
            return f"width*height = {width * height} exceeds {self.max_area}"
        return None

    def describe(self) -> str:
        text = f"multiples of {self.multiple} in {self.min_side}..{self.max_side}"
        return text + (f", width*height <= {self.max_area}" if self.max_area else "")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the driver needs to know about a model before any worker loads it."""

    name: str
    """As the user wrote it: preset name, repo id or folder."""
    family: str
    """Model-family module under cogdist/models/ that runs it."""
    source: str
    """What `from_pretrained` is given (repo id or absolute folder); empty for tiny presets."""
    kind: str
    """"image" or "video"."""
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    sizes: SizeRule
    tiny: bool = False
    """Random weights built in memory from a small config; no download."""
    seed: int = 0
    """Seed of a tiny preset's weights: every process builds the same model."""
    dtype_gpu: str = "bfloat16"
    dtype_cpu: str = "float32"
    conditioning: frozenset[str] = field(default_factory=frozenset)
    """Manifest input columns the model can use (`image`, `video`, `strength`)."""
    description: str = ""


def _cogview4_presets() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="tiny-cogview4",
            family="cogview4",
            source="",
            kind="image",
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=5.0,
            sizes=SizeRule(multiple=32, min_side=64, max_side=512),
            tiny=True,
            seed=0,
            description="CogView4 architecture, random weights, about 0.1 M parameters (CPU friendly)",
        ),
        ModelSpec(
            name="THUDM/CogView4-6B",
            family="cogview4",
            source="THUDM/CogView4-6B",
            kind="image",
            width=1024,
            height=1024,
            num_inference_steps=50,
            guidance_scale=3.5,
            sizes=SizeRule(multiple=32, min_side=512, max_side=2048, max_area=2**21),
            description="CogView4 6B text-to-image (GLM-4-9B text encoder)",
        ),
    ]


PRESETS: dict[str, ModelSpec] = {spec.name: spec for spec in _cogview4_presets()}

# model_index.json `_class_name` -> family module
PIPELINE_FAMILIES = {"CogView4Pipeline": "cogview4"}


def _cogview4_from_configs(name: str, source: str, read: Callable[[str], dict]) -> ModelSpec:
    """Defaults and structural size limits of an unlisted CogView4 checkpoint, from its configs."""
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    multiple = vae_scale * transformer.get("patch_size", 2)
    default_side = transformer.get("sample_size", 128) * vae_scale
    return ModelSpec(
        name=name,
        family="cogview4",
        source=source,
        kind="image",
        width=default_side,
        height=default_side,
        num_inference_steps=50,
        guidance_scale=5.0,
        sizes=SizeRule(multiple=multiple, min_side=multiple, max_side=4096),
        description="CogView4 checkpoint (not a preset: sizes checked structurally only)",
    )


_FROM_CONFIGS = {"cogview4": _cogview4_from_configs}


def resolve_model(name: str) -> ModelSpec:
    """Turn a MODEL argument into a ModelSpec, or raise ModelError saying what was tried."""
    if name in PRESETS:
        return PRESETS[name]
    folder = name[len("file://") :] if name.startswith("file://") else name
    if os.path.isdir(folder):
        folder = os.path.abspath(folder)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelError(f"model folder {folder} has no model_index.json (save one with save_pretrained)")

        def read_local(rel: str) -> dict:
            with open(os.path.join(folder, rel)) as f:
                return json.load(f)

        return _spec_from_index(name, folder, read_local)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _spec_from_index(name, name, _hub_reader(name))
    raise ModelError(
        f"unknown model {name!r}: not a preset (run `cogdist models`), not a folder with "
        "model_index.json, and not a Hugging Face repo id (owner/name)"
    )


def _spec_from_index(name: str, source: str, read: Callable[[str], dict]) -> ModelSpec:
    try:
        index = read("model_index.json")
    except ModelError:
        raise
    except Exception as e:  # JSON or I/O trouble: say which file
        raise ModelError(f"cannot read model_index.json of {name}: {e}") from e
    class_name = index.get("_class_name", "")
    family = PIPELINE_FAMILIES.get(class_name)
    if family is None:
        known = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ModelError(
            f"model {name} is a {class_name or 'pipeline of unknown class'}; cogdist runs {known}"
        )
    try:
        return _FROM_CONFIGS[family](name, source, read)
    except (OSError, KeyError, ValueError) as e:
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
