"""Code that ships with a checkpoint runs only with --trust-remote-code.

Each checkpoint here is the tiny CogView4 pipeline saved with save_pretrained, with one component
pointed at a module in the folder whose import writes a marker file: the marker proves whether
the code ran.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cogdist import validate
from cogdist.errors import ModelError
from cogdist.models.cogview4 import runner as cogview4
from cogdist.models.registry import PRESETS, resolve_model
from cogdist.work import WorkItem
from tests.conftest import cli, write_manifest

CPU = torch.device("cpu")
MODULE = """\
from pathlib import Path

Path({marker!r}).write_text("imported")

from diffusers import FlowMatchEulerDiscreteScheduler


class {cls}(FlowMatchEulerDiscreteScheduler):
    pass
"""


def custom_checkpoint(base: Path, tiny_model_dir: Path, where: str) -> tuple[Path, Path]:
    """(folder, marker): the scheduler is ["my_module", "MyScheduler"] from my_module.py, put in the
    scheduler's folder (where diffusers imports it from) or beside model_index.json."""
    folder = base / f"custom-{where}"
    shutil.copytree(tiny_model_dir, folder)
    marker = base / f"imported-{where}"
    module_dir = folder / "scheduler" if where == "component" else folder
    (module_dir / "my_module.py").write_text(MODULE.format(marker=str(marker), cls="MyScheduler"))
    edit_index(folder, scheduler=["my_module", "MyScheduler"])
    return folder, marker


def edit_index(folder: Path, **entries) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **entries}))


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies trusted modules into HF_MODULES_CACHE and imports them from there: keep
    that inside the test, and forget the imported module afterwards."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("diffusers_modules"):
            del sys.modules[name]


REFUSAL = r"""component 'scheduler' is \["my_module", "MyScheduler"\], not a class of diffusers or transformers.*--trust-remote-code"""


@pytest.mark.parametrize("where", ["component", "root"])
def test_checkpoint_code_is_refused_without_the_opt_in(tmp_path, tiny_model_dir, where):
    folder, marker = custom_checkpoint(tmp_path, tiny_model_dir, where)
    with pytest.raises(ModelError, match=REFUSAL):
        resolve_model(str(folder))
    # The worker checks the files again: a spec that did not opt in cannot load them.
    spec = replace(resolve_model(str(folder), trust_remote_code=True), trust_remote_code=False)
    with pytest.raises(ModelError, match=REFUSAL):
        cogview4.load_pipeline(spec, torch.float32)
    assert not marker.exists(), "the checkpoint's code ran"


def test_with_the_opt_in_a_custom_component_loads_and_renders(tmp_path, tiny_model_dir, modules_cache):
    folder, marker = custom_checkpoint(tmp_path, tiny_model_dir, "component")
    spec = resolve_model(str(folder), trust_remote_code=True)
    assert spec.trust_remote_code and not marker.exists()  # resolving imports nothing
    loaded = cogview4.load_pipeline(spec, torch.float32)
    assert marker.exists() and type(loaded.scheduler).__name__ == "MyScheduler"
    row = WorkItem("x", "a paper crane", None, 5, 64, 64, 2, 5.0, None, "outputs/x.png")
    stock = cogview4.load_pipeline(PRESETS["tiny-cogview4"], torch.float32)
    np.testing.assert_array_equal(
        cogview4.render(loaded, [row], CPU)[0], cogview4.render(stock, [row], CPU)[0]
    )


def test_with_the_opt_in_a_module_outside_the_component_folder_still_does_not_load(
    tmp_path, tiny_model_dir, modules_cache
):
    """diffusers imports a component's code only from the component's own folder."""
    folder, marker = custom_checkpoint(tmp_path, tiny_model_dir, "root")
    spec = resolve_model(str(folder), trust_remote_code=True)
    with pytest.raises(ModelError, match="cannot load .*my_module.*component's own folder"):
        cogview4.load_pipeline(spec, torch.float32)
    assert not marker.exists()


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("case", ["class list", "None.py"])
def test_a_custom_pipeline_class_is_refused_even_with_the_opt_in(tmp_path, tiny_model_dir, case, trust):
    folder = tmp_path / "custom-pipeline"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "imported"
    module = MODULE.format(marker=str(marker), cls="MyPipeline")
    if case == "class list":
        (folder / "my_pipeline.py").write_text(module)
        edit_index(folder, _class_name=["my_pipeline", "MyPipeline"])
        match = r'pipeline class is \["my_pipeline", "MyPipeline"\].*stock diffusers pipelines only'
    else:  # diffusers 0.42 looks for f"{custom_pipeline}.py" with custom_pipeline=None
        (folder / "None.py").write_text(module)
        match = "holds None.py"
    with pytest.raises(ModelError, match=match):
        resolve_model(str(folder), trust_remote_code=trust)
    spec = replace(resolve_model(str(tiny_model_dir)), source=str(folder), trust_remote_code=trust)
    with pytest.raises(ModelError, match=match):
        cogview4.load_pipeline(spec, torch.float32)
    assert not marker.exists()


def test_a_transformers_auto_class_with_an_auto_map_needs_the_opt_in(tmp_path, tiny_model_dir):
    folder = tmp_path / "auto-map"
    shutil.copytree(tiny_model_dir, folder)
    edit_index(folder, tokenizer=["transformers", "AutoTokenizer"])
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "auto_map": {"AutoTokenizer": ["x.Tok", None]}})
    )
    with pytest.raises(ModelError, match="component 'tokenizer' is a transformers AutoTokenizer.*auto_map"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), trust_remote_code=True).trust_remote_code


def test_the_api_and_the_cli_carry_both_opt_ins(tmp_path, tiny_model_dir, pipe_with_both):
    """A checkpoint with pickle weights and code of its own: refused by `cogdist validate` until
    both flags are given; validating never imports the code."""
    folder, marker = pipe_with_both
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a red fox"}])
    with pytest.raises(ModelError, match="--trust-remote-code"):
        validate(str(manifest), model=str(folder))
    with pytest.raises(ModelError, match="--allow-pickle-weights"):
        validate(str(manifest), model=str(folder), trust_remote_code=True)
    assert validate(str(manifest), model=str(folder), trust_remote_code=True, allow_pickle=True).rows == 1

    refused = cli("validate", str(manifest), "--model", str(folder))
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr, refused.stderr
    accepted = cli(
        "validate", str(manifest), "--model", str(folder), "--trust-remote-code", "--allow-pickle-weights"
    )
    assert accepted.returncode == 0, accepted.stderr
    assert not marker.exists()


@pytest.fixture
def pipe_with_both(tmp_path, tiny_model_dir):
    folder, marker = custom_checkpoint(tmp_path, tiny_model_dir, "component")
    pickled = tmp_path / "pickled"
    cogview4.build_tiny(0).save_pretrained(pickled, safe_serialization=False)
    shutil.rmtree(folder / "transformer")
    shutil.copytree(pickled / "transformer", folder / "transformer")
    return folder, marker
