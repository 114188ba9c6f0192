"""--attention-backend: diffusers' names, checked by the driver; the stock processors of every
family routed through the dispatcher to the backend; a backend a worker cannot run refused at its
setup with the reason (exit 2), never rebuilt."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.step_time import backend_call_counter
from cogdist import engine
from cogdist.errors import EXIT_REFUSED, ConfigurationError, ResumeConflictError, UsageError
from cogdist.models.registry import resolve_model
from cogdist.options import RenderOptions
from cogdist.parallel.attention import apply_attention_backend, check_backend_runs
from cogdist.sink.job import recorded_setting
from cogdist.storage import open_location
from cogdist.worker.attention import BACKENDS, CONTEXT_PARALLEL
from cogdist.worker.worker import RenderWorker, WorkerSettings
from tests.conftest import write_manifest
from tests.faults import choosing_differently
from tests.inprocess import render_in_process


def test_the_names_are_diffusers_own_and_the_driver_checks_them():
    assert tuple(name.value for name in AttentionBackendName) == BACKENDS
    assert set(CONTEXT_PARALLEL) == set(_AttentionBackendRegistry._supports_context_parallel)
    spec = resolve_model("tiny-cogview4")
    with pytest.raises(UsageError, match="--attention-backend 'fast': choose auto or one of .*_native_cudnn"):
        RenderOptions("m", "tiny-cogview4", "o", attention_backend="fast").check(spec)
    with pytest.raises(UsageError, match="_native_math does not support context parallelism.*--sp 2"):
        RenderOptions("m", "tiny-cogview4", "o", attention_backend="_native_math", sp=2).check(spec)
    RenderOptions("m", "tiny-cogview4", "o", attention_backend="_native_flash", sp=2).check(spec)


ROWS = [
    {"id": "a", "prompt": "a red fox", "seed": 3},
    {"id": "b", "prompt": "a blue lake at dawn", "seed": 4},
]


@pytest.mark.parametrize(
    "model,extra",
    [("tiny-cogview4", {}), ("tiny-cogvideox", {"frames": 9}), ("tiny-glm-image", {})],
)
def test_every_family_renders_through_the_backend_it_is_given(tmp_path, model, extra):
    """`_native_math` (exact, and it runs on a CPU) reaches the attention calls of the stock
    processors, and the routing changes no pixel: with torch's SDPA held to its math kernel (for
    the text encoder too, which also calls it), the render equals the stock one. (Against the
    default kernel the rounding differs, and tiny random weights amplify it.)"""
    options = {"steps": 2, "width": 64, "height": 64, **extra}
    with sdpa_kernel(SDPBackend.MATH):
        stock = render_in_process(ROWS[:1], model, tmp_path / "stock", **options)
        with backend_call_counter("_native_math") as calls:
            routed = render_in_process(
                ROWS[:1], model, tmp_path / "math", attention_backend="_native_math", **options
            )
    assert calls[0] > 0, "no attention call reached the backend"
    for row in ROWS[:1]:
        assert routed[row["id"]].shape == stock[row["id"]].shape
        difference = abs(routed[row["id"]].astype(int) - stock[row["id"]].astype(int)).max()
        assert difference <= 1, (row["id"], difference)


def test_native_leaves_the_stock_processors_in_place():
    from cogdist.models.cogview4.runner import build_tiny

    transformer = build_tiny().transformer
    before = {
        name: type(module.processor)
        for name, module in transformer.named_modules()
        if hasattr(module, "processor")
    }
    apply_attention_backend(transformer, "native")
    after = {
        name: type(module.processor)
        for name, module in transformer.named_modules()
        if hasattr(module, "processor")
    }
    assert before == after and before


def test_a_backend_this_machine_cannot_run_is_refused_with_the_reason():
    cpu = torch.device("cpu")
    with pytest.raises(UsageError, match=r"flash cannot run on this worker \(cpu, float32\): .*flash-attn"):
        check_backend_runs("flash", cpu, torch.float32)
    with pytest.raises(
        UsageError, match=r"_native_flash cannot run .*\(cpu, float32\): .*bfloat16 or float16"
    ):
        check_backend_runs("_native_flash", cpu, torch.float32)
    check_backend_runs("_native_flash", cpu, torch.bfloat16)


def test_a_worker_that_cannot_run_the_backend_stops_the_job_at_setup_with_exit_2(tmp_path):
    """A ConfigurationError at setup: the loop stops the job at once (exit 2) instead of rebuilding
    the gang (tests/test_engine.py shows that for any configuration failure)."""
    worker = RenderWorker(
        resolve_model("tiny-cogview4"), str(tmp_path), WorkerSettings(attention_backend="xformers")
    )
    with pytest.raises(
        ConfigurationError, match="--attention-backend xformers cannot run on this worker.*xformers"
    ) as raised:
        worker.setup()
    assert raised.value.exit_code == EXIT_REFUSED


def test_auto_is_chosen_once_per_job_and_kept_for_its_resume(ray_session, tmp_path, capsys):
    """Two replicas start with auto; the one whose worker chose differently from the first
    worker's choice (another node's GPU or packages) is started again with the job's choice, which
    OUT's job record keeps: a resume with auto renders with it, a resume with another is refused."""
    manifest = write_manifest(tmp_path / "m.parquet", [*ROWS, {"id": "c", "prompt": "a kite", "seed": 5}])
    out = tmp_path / "out"
    options = RenderOptions(
        str(manifest), "tiny-cogview4", str(out), replicas=2, steps=2, attention_backend="auto"
    )
    summary = engine.run(options, worker_class=choosing_differently(tmp_path, "_native_math"))
    assert summary.ok and summary.done == 3, summary.describe()
    chosen = recorded_setting(open_location(str(out)), "attention_backend")
    assert chosen in (None, "_native_math")  # whichever worker finished its setup first; None: native
    said = capsys.readouterr().err
    assert f"--attention-backend auto: {chosen or 'native'} (the first worker's choice)" in said
    # The replica whose worker chose otherwise rendered nothing: it was started again.
    assert "chose --attention-backend" in said and "starting it again" in said, said[-2000:]
    rendered = {p.name.split("-")[1] for p in tmp_path.glob("render-*")}
    assert rendered == {chosen or "native"}, rendered
    again = engine.run(replace(options, progress=False))
    assert again.done == 0 and again.skipped == 3
    with pytest.raises(ResumeConflictError, match="--attention-backend"):
        engine.run(replace(options, attention_backend="_native_flash" if chosen else "_native_math"))


def test_under_sp_a_cpu_worker_takes_native_only():
    """diffusers' context-parallel kernels of the other backends are CUDA ops: `_native_flash`
    calls aten::_scaled_dot_product_flash_attention, which has no CPU kernel (the one-process
    call the setup probe makes runs; a gang's first row would fail). Refused at setup instead."""
    from cogdist.models.cogview4.runner import build_tiny

    transformer = build_tiny(seed=0).transformer.to(torch.bfloat16)
    with pytest.raises(UsageError, match="--attention-backend _native_flash under --sp 2 needs a GPU"):
        apply_attention_backend(transformer, "_native_flash", sp=2)
    assert apply_attention_backend(transformer, "_native_flash", sp=1) == "_native_flash"
