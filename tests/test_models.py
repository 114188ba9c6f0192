"""Model names: presets, folders, Hub ids; each failure says what was tried."""

from __future__ import annotations

import json

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
    with pytest.raises(ModelError, match="is a StableDiffusionPipeline; cogdist runs CogView4Pipeline"):
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
