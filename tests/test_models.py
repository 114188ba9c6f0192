"""Model names: presets, folders, Hub ids; each failure says what was tried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogdist.errors import ModelError
from cogdist.models.registry import PRESETS, resolve_model


def test_presets_resolve_without_any_download():
    spec = resolve_model("tiny-cogview4")
    assert spec.tiny and spec.family == "cogview4" and spec.kind == "image"
    real = resolve_model("THUDM/CogView4-6B")
    assert real.source == "THUDM/CogView4-6B" and real.dtype_gpu == "bfloat16" and not real.tiny
    assert real.sizes.problem(1024, 1024) is None
    assert real.sizes.problem(2048, 2048) == "width*height = 4194304 exceeds 2097152"
    assert set(PRESETS) >= {"tiny-cogview4", "THUDM/CogView4-6B"}


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match="has no model_index.json"):
        resolve_model(str(tmp_path))


def test_folder_of_an_unsupported_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        ModelError,
        match="is a StableDiffusionPipeline; cogdist runs CogVideoXFunControlPipeline, .*GlmImagePipeline",
    ):
        resolve_model(str(tmp_path))


def test_unknown_name():
    with pytest.raises(ModelError, match="not a preset"):
        resolve_model("no-such-model")


def test_hub_id_that_cannot_be_fetched_names_the_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError, match="cannot fetch model_index.json of Hugging Face repo 'someone/not-cached'"
    ):
        resolve_model("someone/not-cached")


CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints"


@pytest.mark.parametrize("folder", sorted(p.name for p in CHECKPOINTS.iterdir() if p.is_dir()))
def test_real_checkpoint_configs_resolve_like_their_presets(folder):
    """Configs written from each real checkpoint's documented values (see SOURCES.md): read through
    the path an unlisted checkpoint takes, they give the preset's family, tasks and defaults."""
    name = folder.replace("__", "/")
    preset = PRESETS[name]
    spec = resolve_model(str(CHECKPOINTS / folder))
    assert (spec.family, spec.kind, spec.tasks) == (preset.family, preset.kind, preset.tasks)
    assert (spec.width, spec.height, spec.num_frames, spec.fps) == (
        preset.width,
        preset.height,
        preset.num_frames,
        preset.fps,
    )
    assert spec.negative_prompt == preset.negative_prompt
    # The preset's own limits are within what the configs allow structurally.
    assert spec.sizes.problem(preset.width, preset.height) is None
    if preset.frames is not None:
        assert spec.frames.problem(preset.num_frames) is None
        assert spec.frames.latent_multiple == preset.frames.latent_multiple


def test_a_learned_position_checkpoint_takes_its_training_size_only():
    spec = resolve_model(str(CHECKPOINTS / "THUDM__CogVideoX-5b-I2V"))
    assert spec.sizes.only == ((720, 480),)
    assert "is not a size this model takes" in spec.sizes.problem(1360, 768)


def test_presets_of_every_family_resolve_offline():
    for name in ("tiny-cogvideox", "tiny-cogvideox-i2v", "tiny-cogvideox-fun", "tiny-glm-image"):
        spec = resolve_model(name)
        assert spec.tiny and spec.family in ("cogvideox", "glm_image")
    assert resolve_model("THUDM/CogVideoX1.5-5B").frames.problem(81) is None
    assert "not one of 81, 161" in resolve_model("THUDM/CogVideoX1.5-5B").frames.problem(49)
    assert resolve_model("THUDM/CogVideoX-2b").dtype_gpu == "float16"


def test_real_presets_carry_their_parameter_counts_and_models_shows_the_memory_per_offload_tier(capsys):
    """The counts baked into the presets are those of the real checkpoints' configs
    (tests/data/checkpoints), counted on the meta device; `cogdist models` turns them into the
    GPU memory of each --offload tier."""
    import json
    from pathlib import Path

    import diffusers
    import torch
    import transformers

    from cogdist.cli import main

    folders = Path(__file__).parent / "data" / "checkpoints"
    checked = 0
    for spec in PRESETS.values():
        folder = folders / spec.name.replace("/", "__")
        if spec.tiny or not folder.is_dir():
            continue
        index = json.loads((folder / "model_index.json").read_text())
        baked = dict(spec.weights)
        for component in ("transformer", "vae", "vision_language_encoder"):
            if not (folder / component).is_dir():
                continue
            config = json.loads((folder / component / "config.json").read_text())
            library = diffusers if index[component][0] == "diffusers" else transformers
            cls = getattr(library, index[component][1])
            with torch.device("meta"):
                if library is diffusers:
                    model = cls.from_config(config)
                else:
                    model = cls(transformers.AutoConfig.from_pretrained(folder / component))
            assert baked[component] == sum(p.numel() for p in model.parameters()), (spec.name, component)
            checked += 1
    assert checked >= 17
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "--offload none 21.1 GB, model 11.1 GB (the transformer)" in listed  # CogVideoX-5b
