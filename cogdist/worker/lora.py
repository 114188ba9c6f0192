"""LoRA adapters (`--lora SOURCE[,scale=S][,name=N][,weight_name=F]`): checked on the driver,
loaded on every worker through diffusers' LoRA loaders.

Before any worker starts, the driver reads each adapter's weights file (a local file or folder,
an s3:// / gs:// object, or a Hub repo, pinned to the revision fetched now), hashes it and checks
every key against the model's transformer: a module it names must exist there with the shapes
the adapter expects. What it resolved travels to the workers in the same spelling, with
`sha256=` (and `revision=`) added; each worker fetches the file again, refuses one whose hash
changed, and loads it with `load_lora_weights`. By default the adapters are fused into the
weights (`fuse_lora`); unfused, `set_adapters` switches between them per unit (a manifest's
`lora` column names one per row).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse

from cogdist.errors import ConfigurationError, UsageError
from cogdist.models.spec import ModelSpec
from cogdist.storage import redact

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `save_lora_weights` writes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_KEYS = ("scale", "name", "weight_name", "sha256", "revision")
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # peft keeps adapters in ModuleDicts: no dots
# diffusers/peft format, as `save_lora_weights` writes it: transformer.<module>.lora_A.weight
_KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight")


@dataclass(frozen=True)
class Adapter:
    """One `--lora` value, parsed."""

    source: str
    scale: float = 1.0
    name: str = ""
    weight_name: str | None = None
    sha256: str | None = None
    """Of the weights file: checked by every worker (the driver fills it in)."""
    revision: str | None = None
    """A Hub adapter's commit, pinned when the job started."""

    def text(self) -> str:
        """The `--lora` spelling of this adapter (what the workers receive)."""
        parts = [self.source, f"scale={self.scale!r}", f"name={self.name}"]
        parts += [f"{key}={getattr(self, key)}" for key in _KEYS[2:] if getattr(self, key)]
        return ",".join(parts)

    @property
    def use(self) -> tuple[str, float, str]:
        """(name, scale, sha256): how a row records it (WorkItem.adapters, the index)."""
        return (self.name, self.scale, self.sha256 or "")


def parse_adapter(text: str) -> Adapter:
    """An Adapter from SOURCE[,key=value...] (keys: scale, name, weight_name, sha256, revision)."""
    parts = text.split(",")
    values: dict[str, str] = {}
    while len(parts) > 1 and re.fullmatch(r"\s*[a-z_0-9]+\s*=.*", parts[-1]):
        key, _, value = parts.pop().partition("=")
        key = key.strip()
        if key not in _KEYS:
            raise UsageError(f"--lora {redact(text)!r}: unknown key {key!r} (keys: {', '.join(_KEYS)})")
        if key in values:
            raise UsageError(f"--lora {redact(text)!r}: {key} is given twice")
        values[key] = value.strip()
    source = ",".join(parts).strip()  # a path may hold commas
    if not source:
        raise UsageError(
            f"--lora {redact(text)!r}: no SOURCE (a folder, file, s3:// / gs:// URI or Hub repo id)"
        )
    scale = 1.0
    if "scale" in values:
        try:
            scale = float(values["scale"])
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise UsageError(f"--lora {redact(text)!r}: scale={values['scale']} is not a finite number")
    name = values.get("name") or _default_name(source)
    if not _NAME.fullmatch(name):
        raise UsageError(f"--lora {redact(text)!r}: name {name!r} may hold only letters, digits, '_' and '-'")
    return Adapter(
        source, scale, name, values.get("weight_name"), values.get("sha256"), values.get("revision")
    )


def _default_name(source: str) -> str:
    base = source.rstrip("/").rsplit("/", 1)[-1]
    for suffix in WEIGHT_SUFFIXES:
        base = base.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_-]", "_", base) or "lora"


def adapter_names(lora: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(parse_adapter(text).name for text in lora)


def adapter_uses(lora: tuple[str, ...]) -> tuple[tuple[str, float, str], ...]:
    """(name, scale, sha256) of each resolved adapter, in order."""
    return tuple(parse_adapter(text).use for text in lora)


def check_lora(spec: ModelSpec, lora: tuple[str, ...], fuse: bool | None, quantize: str) -> None:
    """Refuse what cannot work before anything is read: syntax, the family, the combination."""
    from cogdist.models.registry import family

    if not lora:
        if fuse is not None:
            raise UsageError("--fuse-lora / --no-fuse-lora need an adapter (--lora)")
        return
    names = adapter_names(lora)
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"--lora: two adapters are named {name!r}; give one another name=")
    reason = family(spec.family).no_lora
    if reason:
        raise UsageError(f"--lora: {spec.name} takes no LoRA adapters: {reason}")
    if importlib.util.find_spec("peft") is None:
        raise UsageError("--lora needs peft (diffusers' LoRA loaders run on it): pip install 'cogdist[lora]'")
    if fuse is False and quantize != "none":
        raise UsageError(
            "--no-fuse-lora with --quantize: an adapter kept apart would run beside quantized weights, "
            "which diffusers' loaders do not support for these models; fused (the default), the "
            "adapter is merged before the weights are quantized"
        )


def resolve_lora(
    spec: ModelSpec,
    lora: tuple[str, ...],
    fuse: bool | None,
    per_row: bool,
    quantize: str,
    allow_pickle: bool,
    storage_timeout: float,
) -> tuple[tuple[str, ...], bool | None]:
    """The adapters as the workers receive them (sha256, revision filled in), every one checked
    against the model's transformer, and whether they are fused. `per_row`: the manifest names
    an adapter per row (a `lora` column), which needs them unfused."""
    if not lora:
        return (), None
    if per_row:
        if fuse:
            raise UsageError(
                "--fuse-lora: the manifest's lora column names an adapter per row, and fused adapters "
                "cannot be switched between units; drop --fuse-lora"
            )
        fuse = False
    fuse = True if fuse is None else fuse
    check_lora(spec, lora, fuse, quantize)
    layers = transformer_layers(spec)
    resolved = []
    for text in lora:
        adapter = parse_adapter(text)
        data, weight_name, revision, _ = _fetch(adapter, allow_pickle, storage_timeout)
        digest = hashlib.sha256(data).hexdigest()
        if adapter.sha256 and adapter.sha256 != digest:
            raise UsageError(f"--lora {redact(adapter.source)}: its sha256 is {digest}, not {adapter.sha256}")
        check_fits(adapter, tensor_shapes(data, weight_name), layers, spec.name)
        where = _portable(adapter.source)
        resolved.append(
            replace(adapter, source=where, weight_name=weight_name, sha256=digest, revision=revision).text()
        )
    return tuple(resolved), fuse


def lora_record(lora: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """The job record's value of --lora: each adapter's name, scale and sha256 (null: none)."""
    return [dict(zip(("name", "scale", "sha256"), parse_adapter(text).use)) for text in lora] or None


def _locate(adapter: Adapter, allow_pickle: bool) -> tuple[str, str, str]:
    """(kind, where, weight file name): kind "local" (a folder), "store" (a URI prefix) or "hub"."""
    source = adapter.source
    if "://" in source and not source.startswith("file://"):
        # A file (read whole) or a prefix holding the weights file; the query may name an endpoint.
        where, weight_name = source, adapter.weight_name or DEFAULT_WEIGHT_NAME
        if urlparse(source).path.endswith(WEIGHT_SUFFIXES):
            where, weight_name = source, urlparse(source).path.rsplit("/", 1)[-1]
        kind = "store"
    else:
        path = os.path.abspath(source.removeprefix("file://"))
        if os.path.isfile(path):
            kind, where, weight_name = "local", os.path.dirname(path), os.path.basename(path)
        elif os.path.isdir(path):
            kind, where, weight_name = "local", path, adapter.weight_name or _weights_in(path, adapter)
        elif source.count("/") == 1 and not source.startswith((".", "/", "file://")):
            kind, where, weight_name = "hub", source, adapter.weight_name or DEFAULT_WEIGHT_NAME
        else:
            raise UsageError(
                f"--lora {redact(source)}: no such file or folder here (a local adapter must exist on every "
                "node), and not an s3:// / gs:// URI or a Hub repo id (owner/name)"
            )
    if not weight_name.endswith(".safetensors") and not allow_pickle:
        raise UsageError(
            f"--lora {redact(source)}: {weight_name} is not safetensors; pickle weights can run code when "
            "loaded: pass --allow-pickle-weights for an adapter you trust"
        )
    return kind, where, weight_name


def _portable(source: str) -> str:
    """What every worker opens: a local path made absolute, an object store's endpoint named."""
    if "://" in source and not source.startswith("file://"):
        from cogdist.storage import input_uri

        return input_uri(source)
    path = os.path.abspath(source.removeprefix("file://"))
    return path if os.path.exists(path) else source  # else a Hub repo id


def _weights_in(folder: str, adapter: Adapter) -> str:
    if os.path.isfile(os.path.join(folder, DEFAULT_WEIGHT_NAME)):
        return DEFAULT_WEIGHT_NAME
    found = sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_SUFFIXES))
    if len(found) == 1:
        return found[0]
    raise UsageError(
        f"--lora {redact(adapter.source)}: {'several' if found else 'no'} weights files in the folder "
        f"({', '.join(found) or 'none'}); name one with weight_name="
    )


def _fetch(
    adapter: Adapter, allow_pickle: bool, storage_timeout: float
) -> tuple[bytes, str, str | None, str | None]:
    """The weights file's bytes, its name, (a Hub adapter) the revision they were read at, and the
    folder on this machine that holds the file (None: it is in an object store)."""
    kind, where, weight_name = _locate(adapter, allow_pickle)
    if kind == "store":
        from cogdist.storage import open_location, read_uri

        if urlparse(where).path.endswith(WEIGHT_SUFFIXES):
            return read_uri(where, storage_timeout), weight_name, None, None
        return open_location(where, storage_timeout).read_bytes(weight_name), weight_name, None, None
    revision = adapter.revision
    path = os.path.join(where, weight_name) if kind == "local" else _hub_file(where, weight_name, revision)
    if kind == "hub":
        commit = os.path.basename(os.path.dirname(path))  # .../snapshots/<commit>/<file>
        revision = revision or (commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None)
    with open(path, "rb") as f:
        return f.read(), weight_name, revision, os.path.dirname(path)


def _hub_file(repo: str, weight_name: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, weight_name, revision=revision)
    except Exception as e:
        raise UsageError(
            f"--lora {repo}: cannot fetch {weight_name} from the Hub ({type(e).__name__}: {e}); check "
            "the name, weight_name=, your network and HF_TOKEN, or pass a local folder"
        ) from e


def tensor_shapes(data: bytes, weight_name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a weights file (safetensors: from its header alone)."""
    if weight_name.endswith(".safetensors"):
        try:
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + size])
            return {key: tuple(value["shape"]) for key, value in header.items() if key != "__metadata__"}
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--lora: {weight_name} is not a readable safetensors file ({e})") from e
    import torch  # pickle weights, allowed by --allow-pickle-weights

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def transformer_layers(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Module name -> (inputs, outputs) of every layer of the model's transformer that a LoRA can
    adapt (linear and convolution layers), from a model built on the meta device (no weights)."""
    import diffusers
    import torch

    from cogdist.models.registry import family

    if spec.tiny:
        transformer = family(spec.family).load_runner().load(spec, torch.float32).transformer
    else:
        config = _transformer_config(spec)
        with torch.device("meta"):
            transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = (module.in_features, module.out_features)
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            layers[name] = (module.in_channels, module.out_channels)
    return layers


def _transformer_config(spec: ModelSpec) -> dict:
    if os.path.isdir(spec.source):
        path = os.path.join(spec.source, "transformer", "config.json")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(spec.source, "transformer/config.json")
    with open(path) as f:
        return json.load(f)


def check_fits(
    adapter: Adapter, shapes: dict[str, tuple[int, ...]], layers: dict[str, tuple[int, int]], model: str
) -> None:
    """Refuse an adapter whose keys do not fit the transformer, naming the first ones that do not."""
    problems = []
    for key, shape in sorted(shapes.items()):
        match = _KEY.fullmatch(key)
        if match is None:
            problems.append(
                f"key {key!r} is not a transformer LoRA weight in diffusers' format "
                "(transformer.<module>.lora_A/lora_B.weight, as save_lora_weights writes)"
            )
            continue
        module, side = match["module"], match["side"]
        if module not in layers:
            problems.append(f"{model}'s transformer has no layer {module!r}")
            continue
        inputs, outputs = layers[module]
        if len(shape) < 2:
            problems.append(f"{key} has shape {list(shape)}")
        elif side == "A" and shape[1] != inputs:
            problems.append(f"{key} takes {shape[1]} inputs; {module} gives {inputs}")
        elif side == "B" and shape[0] != outputs:
            problems.append(f"{key} makes {shape[0]} outputs; {module} has {outputs}")
    if not shapes:
        problems.append("it holds no tensors")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(
            f"--lora {redact(adapter.source)}: adapter {adapter.name!r} does not fit {model} (another model "
            f"family or size?): {'; '.join(problems[:3])}{more}"
        )


class LoadedAdapters:
    """A worker's adapters, loaded into its pipeline: fused for good, or switched per unit."""

    def __init__(self, pipe: Any, lora: tuple[str, ...], fuse: bool, storage_timeout: float):
        self.pipe = pipe
        self.fused = fuse
        self.active: tuple[tuple[str, float, str], ...] | None = None
        adapters = [parse_adapter(text) for text in lora]
        for adapter in adapters:
            with _local_copy(adapter, storage_timeout) as (folder, weight_name):
                pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter.name)
        names, scales = [a.name for a in adapters], [a.scale for a in adapters]
        pipe.set_adapters(names, scales)
        if fuse:
            pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
            pipe.unload_lora_weights()  # the merged weights stay; the LoRA layers go
        else:
            self.active = tuple(a.use for a in adapters)

    def activate(self, uses: tuple[tuple[str, float, str], ...]) -> None:
        """Render the next unit with these adapters (none: the base model)."""
        if self.fused or uses == self.active:
            return
        if uses:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _, _ in uses], [scale for _, scale, _ in uses])
        else:
            self.pipe.disable_lora()
        self.active = uses


@contextlib.contextmanager
def _local_copy(adapter: Adapter, storage_timeout: float) -> Iterator[tuple[str, str]]:
    """The adapter's weights as a local (folder, file name), its sha256 checked; an object-store
    adapter is downloaded to a temporary folder, removed on exit."""
    data, weight_name, _, folder = _fetch(adapter, True, storage_timeout)  # the driver checked the kind
    digest = hashlib.sha256(data).hexdigest()
    if adapter.sha256 and digest != adapter.sha256:
        raise ConfigurationError(
            f"--lora {redact(adapter.source)}: the weights changed since the job started (sha256 {digest}, "
            f"checked {adapter.sha256}); every worker must load the same adapter"
        )
    if folder is not None:
        yield folder, weight_name
        return
    temporary = tempfile.mkdtemp(prefix="cogdist-lora-")
    try:
        with open(os.path.join(temporary, weight_name), "wb") as f:
            f.write(data)
        yield temporary, weight_name
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
