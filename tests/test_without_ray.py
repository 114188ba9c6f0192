"""The worker side runs without Ray: a GPU machine with torch but no Ray builds and renders a
pipeline in one process exactly as a worker does (`RenderWorker.setup`, then `render`).

Run in a subprocess whose import system refuses `ray`, so a stray import anywhere on the path
fails the test with the importing module named.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

BLOCK_RAY = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name} is blocked: the worker side must run without Ray")
sys.meta_path.insert(0, NoRay())
"""

WORKER_SIDE = ["cogdist.models", "cogdist.parallel", "cogdist.worker", "cogdist.sink.encode"]


def run_without_ray(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_RAY + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_worker_side_imports_without_ray():
    result = run_without_ray(
        f"""
        import importlib, pkgutil
        for name in {WORKER_SIDE!r}:
            module = importlib.import_module(name)
            for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
                importlib.import_module(info.name)
        print("imported", sorted(m for m in sys.modules if m.startswith("cogdist")))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = result.stdout
    # Every family's torch code, every parallelism and the worker itself came in.
    for module in ("cogdist.parallel.sequence", "cogdist.parallel.vae", "cogdist.worker.worker"):
        assert f"'{module}'" in imported


def test_a_worker_renders_in_one_process_without_ray(tmp_path):
    result = run_without_ray(
        f"""
        import io
        import numpy as np
        from PIL import Image
        from cogdist.models.registry import resolve_model
        from cogdist.work import WorkItem, WorkUnit
        from cogdist.worker.worker import RenderWorker, WorkerSettings

        spec = resolve_model("tiny-cogview4")
        worker = RenderWorker(spec, {str(tmp_path)!r}, WorkerSettings())
        worker.setup()
        item = WorkItem(id="a", prompt="a fox", negative_prompt=None, seed=1, width=64, height=64,
                        num_inference_steps=2, guidance_scale=5.0, num_frames=None, output="a.png")
        [row] = worker.render(WorkUnit(0, (item,))).items
        assert row.ok, row.error
        image = np.asarray(Image.open({str(tmp_path / "a.png")!r}))
        print("rendered", image.shape, row.sha256)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rendered (64, 64, 3)" in result.stdout


def test_an_in_process_worker_beside_ray_starts_no_ray_instance(tmp_path):
    """With Ray installed but not started (a benchmark, tests' in-process references), the worker
    names its node by host name instead of starting a Ray instance to ask."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, ray
                from cogdist.models.registry import resolve_model
                from cogdist.worker.worker import RenderWorker, WorkerSettings
                worker = RenderWorker(resolve_model("tiny-cogview4"), {str(tmp_path)!r}, WorkerSettings())
                print("node", worker.node == os.uname().nodename, "ray started", ray.is_initialized())
                """
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "node True ray started False" in result.stdout
