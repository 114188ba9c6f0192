"""--lora: adapters made here with peft on the tiny transformers (from folders `cogdist models
--save` writes), loaded by every worker through diffusers' LoRA loaders, fused or switched per
unit; each render equals stock diffusers with the same adapter loaded, and what cannot work is
refused before any worker starts."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from diffusers import CogView4Pipeline, DiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from torch._dynamo.utils import counters

from cogdist import engine
from cogdist.errors import ConfigurationError, ManifestError, ResumeConflictError, UsageError
from cogdist.models.cogvideox import runner as cogvideox
from cogdist.models.registry import PRESETS
from cogdist.options import RenderOptions
from cogdist.storage import open_location
from cogdist.worker.lora import LoadedAdapters
from cogdist.worker.offload import place
from tests.conftest import cli, read_table, write_manifest
from tests.inprocess import in_process_worker, render_in_process
from tests.test_cogvideox import CPU, MEMORY, TASKS, row, stock
from tests.test_cogvideox import pipe_of as cogvideox_pipe

ROWS = [
    {"id": "a", "prompt": "a red fox in the snow", "seed": 3},
    {"id": "b", "prompt": "a lighthouse", "seed": 4},
]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(pipe, folder: Path, seed: int, targets=TARGETS) -> Path:
    """A LoRA of `pipe`'s transformer with random (not zero: init_lora_weights=False) weights,
    saved with the pipeline's own save_lora_weights; the transformer is left as it was."""
    transformer = pipe.transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(
            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        )
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    transformer.delete_adapters("default")
    return folder


def fresh(pipe):
    """`pipe` with its weights in fresh storage, as cogdist's loader leaves them (see
    cogdist.models.loading: unaligned safetensors buffers round a last bit differently)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_image(folder: Path, adapters: list[tuple[Path, float]], fuse: bool, item: dict, steps: int = 4):
    """The row as stock diffusers renders it with the adapters loaded (fused or not)."""
    pipe = fresh(DiffusionPipeline.from_pretrained(folder))
    for number, (lora, _) in enumerate(adapters):
        pipe.load_lora_weights(lora, adapter_name=f"a{number}")
    if adapters:
        pipe.set_adapters([f"a{n}" for n in range(len(adapters))], [scale for _, scale in adapters])
        if fuse:
            pipe.fuse_lora()
    generator = torch.Generator("cpu").manual_seed(item["seed"])
    return np.asarray(
        pipe(item["prompt"], num_inference_steps=steps, generator=generator).images[0], dtype=int
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """tiny-cogview4 written by `cogdist models --save`, and two adapters made on it."""
    root = tmp_path_factory.mktemp("lora")
    done = cli("models", "--save", "tiny-cogview4", str(root / "cogview4"))
    assert done.returncode == 0, done.stderr
    assert "saved tiny-cogview4 to" in done.stdout
    pipe = CogView4Pipeline.from_pretrained(root / "cogview4")
    return {
        "model": root / "cogview4",
        "A": make_lora(pipe, root / "styleA", seed=1),
        "B": make_lora(pipe, root / "styleB", seed=2, targets=["to_q", "to_v", "proj_out"]),
    }


def test_models_save_writes_a_folder_that_stock_diffusers_renders_as_cogdist_does(saved, tmp_path):
    ours = render_in_process(ROWS[:1], "tiny-cogview4", tmp_path / "preset", steps=4)
    np.testing.assert_array_equal(ours["a"], stock_image(saved["model"], [], False, ROWS[0]))
    refused = cli("models", "--save", "THUDM/CogView4-6B", str(tmp_path / "x"))
    assert refused.returncode == 2 and "is a Hub checkpoint" in refused.stderr
    assert "tiny-cogvideox-i2v" in refused.stderr  # the presets that can be saved
    assert cli("models", "--save", "tiny-cogview4", str(saved["model"])).returncode == 2  # not empty


@pytest.mark.parametrize("fuse", [True, False])
def test_an_adapter_changes_the_render_as_it_changes_stock_diffusers(saved, tmp_path, fuse):
    lora = f"{saved['A']},scale=0.7"
    ours = render_in_process(
        ROWS, str(saved["model"]), tmp_path / "out", lora=(lora,), fuse_lora=fuse, steps=4, progress=False
    )
    for item in ROWS:
        assert np.abs(ours[item["id"]] - stock_image(saved["model"], [], fuse, item)).max() > 10
        np.testing.assert_array_equal(
            ours[item["id"]], stock_image(saved["model"], [(saved["A"], 0.7)], fuse, item)
        )


@pytest.mark.parametrize("case", list(TASKS))
def test_every_cogvideox_task_loads_an_adapter_as_stock_diffusers_does(case, tmp_path):
    preset, inputs, _, _ = TASKS[case]
    base = cogvideox_pipe(preset)
    lora = make_lora(base, tmp_path / "lora", seed=5)
    item = replace(row(case), num_inference_steps=2)
    ours = cogvideox.load_pipeline(PRESETS[preset], torch.float32)
    LoadedAdapters(ours, (f"{lora},scale=0.8,name=style",), fuse=True, storage_timeout=10)
    [pixels] = cogvideox.render(place(ours, CPU, MEMORY), [item], CPU, [inputs])
    theirs = cogvideox.load_pipeline(PRESETS[preset], torch.float32)
    theirs.load_lora_weights(lora, adapter_name="style")
    theirs.set_adapters(["style"], [0.8])
    theirs.fuse_lora()
    np.testing.assert_array_equal(pixels, stock(place(theirs, CPU, MEMORY), item, inputs))
    assert np.abs(pixels.astype(int) - stock(base, item, inputs).astype(int)).max() > 10


def test_adapters_that_cannot_work_are_refused_before_any_worker_starts(saved, tmp_path):
    manifest = str(write_manifest(tmp_path / "m.parquet", ROWS))
    model = str(saved["model"])

    def refused(error=UsageError, model=model, manifest=manifest, **options) -> str:
        with pytest.raises(error) as caught:
            engine.plan(RenderOptions(manifest, model, str(tmp_path / "o"), **options))
        return str(caught.value)

    assert "takes no LoRA adapters: diffusers' GlmImagePipeline has no LoRA loader" in refused(
        model="tiny-glm-image", lora=(str(saved["A"]),)
    )
    video = make_lora(cogvideox_pipe("tiny-cogvideox"), tmp_path / "video", seed=3)
    assert "does not fit" in refused(lora=(str(video),))  # a CogVideoX adapter on CogView4
    # A key naming a module the transformer does not have.
    odd = tmp_path / "odd"
    shutil.copytree(saved["A"], odd)
    weights = odd / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    index = data.index(b"transformer_blocks.1.attn1.to_q")
    data[index : index + len("transformer_blocks.1")] = b"transformer_blocks.7"
    weights.write_bytes(bytes(data))
    assert "has no layer 'transformer_blocks.7.attn1.to_q'" in refused(lora=(str(odd),))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, pickled / "adapter.bin")
    assert "adapter.bin is not safetensors" in refused(lora=(str(pickled),))
    assert "no such file or folder" in refused(lora=(str(tmp_path / "missing"),))
    real_find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a)
        )
        assert "--lora needs peft" in refused(lora=(str(saved["A"]),))
    assert "unknown key 'scal'" in refused(lora=(f"{saved['A']},scal=2",))
    assert "two adapters are named 'styleA'" in refused(lora=(str(saved["A"]), f"{saved['A']},scale=2"))
    assert "its sha256 is" in refused(lora=(f"{saved['A']},sha256={'0' * 64}",))
    assert "beside quantized weights" in refused(lora=(str(saved["A"]),), fuse_lora=False, quantize="int8")
    assert "need an adapter" in refused(fuse_lora=True)
    per_row = str(
        write_manifest(
            tmp_path / "rows.parquet", [{**ROWS[0], "lora": "styleA"}, {**ROWS[1], "lora": "nope"}]
        )
    )
    assert "cannot be switched" in refused(manifest=per_row, lora=(str(saved["A"]),), fuse_lora=True)
    message = refused(ManifestError, manifest=per_row, lora=(str(saved["A"]),))
    assert (
        "row 1, id 'b', column 'lora' = 'nope': names no adapter of this job (--lora names: styleA)"
        in message
    )
    assert "row 0" not in message


def test_pickle_adapters_load_only_with_the_opt_in_and_render_the_same(saved, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(
        load_file(saved["A"] / "pytorch_lora_weights.safetensors"), pickled / "pytorch_lora_weights.bin"
    )
    rows, model = ROWS[:1], str(saved["model"])
    with pytest.raises(UsageError, match="pytorch_lora_weights.bin is not safetensors"):
        render_in_process(rows, model, tmp_path / "refused", lora=(str(pickled),))
    opted = render_in_process(
        rows, model, tmp_path / "pickle", lora=(str(pickled),), allow_pickle=True, steps=4
    )
    safe = render_in_process(rows, model, tmp_path / "safe", lora=(str(saved["A"]),), steps=4)
    np.testing.assert_array_equal(opted["a"], safe["a"])


def test_a_worker_refuses_an_adapter_that_changed_since_the_job_started(saved, tmp_path):
    lora = tmp_path / "lora"
    shutil.copytree(saved["A"], lora)
    worker, job, _ = in_process_worker(ROWS[:1], str(saved["model"]), tmp_path / "out", lora=(str(lora),))
    shutil.copy(saved["B"] / "pytorch_lora_weights.safetensors", lora / "pytorch_lora_weights.safetensors")
    with pytest.raises(ConfigurationError, match="the weights changed since the job started"):
        worker.setup()


def test_an_adapter_on_the_object_store_renders_as_the_local_one(saved, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/adapters/styleA"
    data = (saved["A"] / "pytorch_lora_weights.safetensors").read_bytes()
    open_location(uri).write_bytes("pytorch_lora_weights.safetensors", data)
    options = {"steps": 4, "progress": False}
    remote = render_in_process(ROWS[:1], str(saved["model"]), tmp_path / "s3", lora=(uri,), **options)
    local = render_in_process(
        ROWS[:1], str(saved["model"]), tmp_path / "local", lora=(str(saved["A"]),), **options
    )
    np.testing.assert_array_equal(remote["a"], local["a"])


def test_unfused_adapters_switch_inside_compiled_blocks(saved, tmp_path, monkeypatch):
    """Dynamo traces peft's layers in the compiled blocks and follows set_adapters between units
    (aot_eager: the tracing, without inductor's minutes of code generation here)."""
    import cogdist.worker.worker as worker_module

    monkeypatch.setattr(
        worker_module,
        "compile_transformer",
        functools.partial(worker_module.compile_transformer, backend="aot_eager"),
    )
    rows = [
        {**ROWS[0], "id": n, "lora": name}
        for n, name in (("1", "styleA"), ("2", "styleB"), ("3", ""), ("4", "styleA"))
    ]
    lora = (str(saved["A"]), f"{saved['B']},scale=0.5")
    torch._dynamo.reset()
    counters.clear()
    try:  # A, B, the base: each switch recompiles, the costly part here
        compiled = render_in_process(
            rows[:3], str(saved["model"]), tmp_path / "compiled", lora=lora, compile=True, steps=2
        )
        assert counters["stats"]["unique_graphs"] >= 3  # compiled, once per adapter set at least
    finally:
        torch._dynamo.reset()
    eager = render_in_process(rows, str(saved["model"]), tmp_path / "eager", lora=lora, steps=2)
    for n in "123":
        assert np.abs(compiled[n] - eager[n]).max() <= 1, n
    assert np.abs(eager["1"] - eager["2"]).max() > 10 and np.abs(eager["1"] - eager["3"]).max() > 10
    np.testing.assert_array_equal(eager["1"], eager["4"])  # back to A after B and the base


def test_a_fused_adapter_is_quantized_with_the_weights(saved, tmp_path):
    options = {"steps": 4, "progress": False, "quantize": "int8"}
    base = render_in_process(ROWS[:1], str(saved["model"]), tmp_path / "base", **options)
    fused = render_in_process(
        ROWS[:1], str(saved["model"]), tmp_path / "lora", lora=(str(saved["A"]),), **options
    )
    exact = stock_image(saved["model"], [(saved["A"], 1.0)], True, ROWS[0])
    assert np.abs(fused["a"] - base["a"]).max() > 10
    assert np.abs(fused["a"] - exact).mean() < np.abs(base["a"] - exact).mean()


def pixels_of(out: Path, table, item_id: str) -> np.ndarray:
    [record] = table.filter(ds.field("id") == item_id).to_pylist()
    return np.asarray(Image.open(out / record["path"]), dtype=int)


@pytest.mark.e2e
def test_a_fused_adapter_through_the_cli_on_a_gang_of_two(saved, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    out = tmp_path / "out"
    # The preset: the same weights as the saved folder, whose configs let --sp 2 take smaller sizes
    # than it splits (check_layout reads a folder's smallest size as its VAE's multiple).
    command = ["render", str(manifest), "--model", "tiny-cogview4", "--out", str(out), "--steps", "4"]
    lora = ["--lora", f"{saved['A']},scale=0.7,name=fox"]
    done = cli(*command, *lora, "--sp", "2", "--replicas", "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    table = read_table(str(out))[0]
    sha = json.loads((out / "_cogdist" / "job.json").read_text())["settings"]["lora"][0]["sha256"]
    assert (
        sha
        == __import__("hashlib")
        .sha256((saved["A"] / "pytorch_lora_weights.safetensors").read_bytes())
        .hexdigest()
    )
    for item in ROWS:
        expected = stock_image(saved["model"], [(saved["A"], 0.7)], True, item)
        assert np.abs(pixels_of(out, table, item["id"]) - expected).max() <= 2  # SP reduction order
    assert table["adapters"].to_pylist() == [[{"name": "fox", "scale": 0.7, "sha256": sha}]] * 2
    # Another scale is another job: refused up front, before Ray starts (the CLI's exit 2).
    other = RenderOptions(str(manifest), "tiny-cogview4", str(out), steps=4, sp=2, replicas=1, progress=False)
    with pytest.raises(ResumeConflictError, match="--lora: .*'scale': 0.7.*'scale': 0.5"):
        engine.run(replace(other, lora=(f"{saved['A']},scale=0.5,name=fox",)))


@pytest.mark.e2e
def test_adapters_named_per_row_equal_single_adapter_jobs(saved, tmp_path):
    rows = [
        {"id": f"r{n}", "prompt": prompt, "seed": 10 + n, "lora": lora}
        for n, (prompt, lora) in enumerate(
            [("a red fox", "styleA"), ("a lighthouse", "styleB"), ("a red fox", None), ("an owl", "styleB")]
        )
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    adapters = [str(saved["A"]), f"{saved['B']},scale=0.6"]
    done = cli(
        "render", str(manifest), "--model", str(saved["model"]), "--out", str(out), "--steps", "4",
        "--replicas", "1", "--batch-size", "2", "--no-progress", *[a for lora in adapters for a in ("--lora", lora)],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = read_table(str(out))[0]
    assert json.loads((out / "_cogdist" / "job.json").read_text())["settings"]["fuse_lora"] is False
    for name, lora in (("styleA", adapters[:1]), ("styleB", adapters[1:]), (None, [])):
        chosen = [{k: v for k, v in r.items() if k != "lora"} for r in rows if r["lora"] == name]
        alone = render_in_process(
            chosen,
            str(saved["model"]),
            tmp_path / f"alone-{name}",
            lora=tuple(lora),
            fuse_lora=False if lora else None,
            steps=4,
        )
        for r in chosen:
            assert np.abs(pixels_of(out, table, r["id"]) - alone[r["id"]]).max() <= 1, r["id"]
    by_id = dict(zip(table["id"].to_pylist(), table["adapters"].to_pylist()))
    assert (
        by_id["r2"] is None
        and [a["name"] for a in by_id["r3"]] == ["styleB"]
        and by_id["r3"][0]["scale"] == 0.6
    )
