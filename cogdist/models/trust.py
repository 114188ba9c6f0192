"""What loading a checkpoint may do: unpickle weights, import Python code that ships with it.

Both are refused unless the user opts in: `--allow-pickle-weights` (`allow_pickle=True`) and
`--trust-remote-code` (`trust_remote_code=True`). Plain data: importing this does not import torch,
so the driver checks a checkpoint before any worker starts, and the worker checks it again before
`from_pretrained` (the files it loads may have been fetched only there).

How diffusers 0.42 `DiffusionPipeline.from_pretrained` comes to import code from a checkpoint
(`pipelines/pipeline_utils.py`, `pipeline_loading_utils.py`):
- a component `[library, class]` in model_index.json whose folder holds `<library>.py` is imported
  from that file (`get_class_obj_and_candidates`, with trust_remote_code);
- any other library that is not `diffusers`, `transformers` or a diffusers pipeline module is
  refused by diffusers unless the process has already imported a module of that name;
- `_class_name` given as `[module, class]` loads a custom pipeline class from `<module>.py` in the
  folder or the Hub repo, and, when the repo has no such file, from diffusers' community-pipeline
  mirror without asking for trust_remote_code; a folder holding `None.py` is taken for a custom
  pipeline too (`_resolve_custom_pipeline_and_cls` formats the missing name as "None");
- a transformers `Auto*` class follows `auto_map` in its component's config to code in the repo.
"""

from __future__ import annotations

import importlib.util
import json
import os

from cogdist.errors import ModelError

ALLOW_PICKLE_FLAG = "--allow-pickle-weights"
TRUST_CODE_FLAG = "--trust-remote-code"
LIBRARIES = ("diffusers", "transformers")
"""Libraries a component may come from without --trust-remote-code (plus diffusers' pipeline modules)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_SUFFIXES = (".safetensors",)


def components(index: dict) -> dict[str, list]:
    """The components model_index.json declares: name -> [library, class] (None for a missing one)."""
    return {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}


def check_index(name: str, index: dict, *, trust_remote_code: bool) -> None:
    """Refuse a checkpoint whose model_index.json makes diffusers import code from it."""
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(
            f"model {name}: its pipeline class is {json.dumps(class_name)}, custom code that ships "
            "with the checkpoint; cogdist renders with the stock diffusers pipelines only, with or "
            f"without {TRUST_CODE_FLAG}"
        )
    if trust_remote_code:
        return
    for component, (library, cls) in components(index).items():
        if library is None and cls is None:  # an optional component left out
            continue
        if not _known_library(library) or not (isinstance(cls, str) and cls.isidentifier()):
            raise ModelError(
                f"model {name}: component {component!r} is {json.dumps([library, cls])}, not a class "
                f"of {' or '.join(LIBRARIES)}: loading it would import Python code that ships with the "
                f"checkpoint. {_trust_hint()}"
            )


def check_folder(name: str, folder: str, index: dict, *, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse a checkpoint folder with code diffusers would import, or with pickle-only weights."""
    check_index(name, index, trust_remote_code=trust_remote_code)
    if os.path.isfile(os.path.join(folder, "None.py")):
        raise ModelError(
            f"model {name}: {folder} holds None.py, which diffusers 0.42 imports as a custom "
            "pipeline class; cogdist renders with the stock diffusers pipelines only. Remove the file."
        )
    pickle_only = []
    for component, (library, cls) in components(index).items():
        path = os.path.join(folder, component)
        if library is None or not os.path.isdir(path):
            continue
        files = sorted(os.listdir(path))
        if not trust_remote_code:
            if f"{library}.py" in files:
                raise ModelError(
                    f"model {name}: component {component!r} holds {component}/{library}.py, which "
                    f"diffusers would import in place of {library}. {_trust_hint()}"
                )
            if library == "transformers" and str(cls).startswith("Auto") and _has_auto_map(path, files):
                raise ModelError(
                    f"model {name}: component {component!r} is a transformers {cls} whose config names "
                    f"code of its own (auto_map). {_trust_hint()}"
                )
        if not any(f.endswith(SAFE_SUFFIXES) for f in files):
            pickle_only += [f"{component}/{f}" for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickle_only and not allow_pickle:
        names = ", ".join(sorted({path.split("/")[0] for path in pickle_only}))
        raise ModelError(
            f"model {name}: only pickle weights for {names} "
            f"({', '.join(pickle_only)}), which can run code when they are loaded. Convert them to "
            f"safetensors, or pass {ALLOW_PICKLE_FLAG} (allow_pickle=True in the Python API) to load "
            "them, only for a checkpoint you trust."
        )


def check_folder_index(name: str, folder: str, *, allow_pickle: bool, trust_remote_code: bool) -> dict:
    """`check_folder` on a folder's own model_index.json, which is returned."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read model_index.json of {name}: {e}") from e
    check_folder(name, folder, index, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return index


def _trust_hint() -> str:
    return (
        f"cogdist runs such code only with {TRUST_CODE_FLAG} (trust_remote_code=True in the Python "
        "API); pass it only for a checkpoint whose code you have read and trust."
    )


def _known_library(library: object) -> bool:
    if library in LIBRARIES:
        return True
    if not (isinstance(library, str) and library.isidentifier()):
        return False
    # A module of diffusers' own pipelines (save_pretrained records GLM-Image's processor under
    # "glm_image"), found on disk: importing diffusers here would take seconds and import torch.
    found = importlib.util.find_spec("diffusers")
    roots = found.submodule_search_locations if found else None
    return any(
        os.path.isfile(os.path.join(root, "pipelines", library, "__init__.py")) for root in roots or ()
    )


def _has_auto_map(path: str, files: list[str]) -> bool:
    for file in files:
        if file.endswith(".json"):
            try:
                with open(os.path.join(path, file)) as f:
                    if "auto_map" in json.load(f):
                        return True
            except (OSError, ValueError, TypeError):
                continue
    return False
