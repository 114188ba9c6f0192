"""Every family is one declared FamilySpec that imports no torch, with a runner behind it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cogdist.models.registry import FAMILIES, PIPELINE_FAMILIES, PRESETS
from cogdist.models.spec import FamilyRunner

BLOCKED = ("torch", "diffusers", "transformers")


def test_specs_and_registry_import_with_torch_blocked():
    """The driver reads specs, resolves presets and checks options without torch."""
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"{{name}} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import cogdist.models.spec
        from cogdist.models import cogvideox, cogview4, glm_image
        from cogdist.models.layout import check_layout
        from cogdist.models.registry import FAMILIES, PRESETS, resolve_model
        from cogdist.worker.cache import check_step_cache

        for spec in (cogview4.SPEC, cogvideox.SPEC, glm_image.SPEC):
            assert FAMILIES[spec.name] is spec
        for name, preset in PRESETS.items():
            assert resolve_model(name).name == name and preset.family in FAMILIES
            check_layout(preset, 2, True)
            check_step_cache(preset.family, name, "none", None)
        assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_runner_is_a_family_runner():
    for spec in FAMILIES.values():
        runner = spec.load_runner()
        assert isinstance(runner, FamilyRunner), spec.name
        for method in ("load", "render", "prepare_inputs"):
            assert callable(getattr(runner, method))


def test_a_spec_declares_what_the_registry_and_parallel_code_read():
    for spec in FAMILIES.values():
        assert all(preset.family == spec.name for preset in spec.presets)
        assert spec.cfg_parallel in ("batched", "paired")
        assert {t for tasks in spec.index_classes.values() for t in tasks} <= set(spec.pipelines)
        assert not set(spec.step_caches) & set(spec.no_step_cache)
        for class_name in spec.index_classes:
            assert PIPELINE_FAMILIES[class_name][0] == spec.name
    assert len(PRESETS) == sum(len(spec.presets) for spec in FAMILIES.values())


def test_pipeline_class_names_are_diffusers_classes():
    import diffusers

    for spec in FAMILIES.values():
        for name in {*spec.pipelines.values(), *spec.index_classes}:
            assert isinstance(getattr(diffusers, name), type), name
