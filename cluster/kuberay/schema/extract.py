"""Extract the RayCluster and RayJob schemas from KubeRay's CRDs into small JSON Schema files.

    python cluster/kuberay/schema/extract.py [CRD_DIR]   # default: /work/shared/kuberay

CRD_DIR holds `ray.io_rayclusters.yaml` and `ray.io_rayjobs.yaml` as KubeRay publishes them
(ray-project/kuberay, `ray-operator/config/crd/bases/`). For each, the `openAPIV3Schema` of the
`ray.io/v1` version (served, and the storage version) is written next to this script as
`raycluster.schema.json` / `rayjob.schema.json`, so the tests can validate `cluster/kuberay/*.yaml`
without the CRDs (CI has only this repository). To keep the files small and reviewable:

- `description` keywords are dropped (they document, they do not constrain);
- a subtree repeated within one schema (the pod spec of the head, worker and submitter pod
  templates, the container schema shared by containers and initContainers, ...) is written once
  under `$defs` and referenced with `$ref`, which validates exactly the same documents.

Everything else (types, `required`, patterns, enums, `x-kubernetes-*` markers) is kept verbatim;
the test module adds Kubernetes' strict unknown-field checking on top. The output depends only
on the input: keys are sorted and `$defs` names come from a sorted walk, so re-running the script
on the same CRDs reproduces the shipped files byte for byte.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_CRD_DIR = Path("/work/shared/kuberay")
VERSION = "v1"
CRDS = {"raycluster": "ray.io_rayclusters.yaml", "rayjob": "ray.io_rayjobs.yaml"}
# Only subtrees at least this long (compact JSON) are worth a $defs entry.
MIN_SHARED_CHARS = 400
# Keywords whose values are schemas (or maps/lists of schemas); everything else is data.
SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties")
SCHEMA_LIST_KEYWORDS = ("anyOf", "allOf", "oneOf")
SCHEMA_KEYWORDS = ("items", "additionalProperties", "not")

Schema = dict


def canonical(node: object) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def child_schemas(schema: Schema) -> list[tuple[str, Schema]]:
    """(name, subschema) for every schema directly inside `schema`, in a fixed order."""
    children: list[tuple[str, Schema]] = []
    for keyword in SCHEMA_MAP_KEYWORDS:
        for name in sorted(schema.get(keyword, {})):
            children.append((name, schema[keyword][name]))
    for keyword in SCHEMA_LIST_KEYWORDS:
        for index, option in enumerate(schema.get(keyword, [])):
            children.append((f"{keyword}{index}", option))
    for keyword in SCHEMA_KEYWORDS:
        if isinstance(schema.get(keyword), dict):
            children.append((keyword, schema[keyword]))
    return children


def map_children(schema: Schema, transform) -> Schema:
    """A copy of `schema` with `transform(name, child)` applied to each direct subschema."""
    result = dict(schema)
    for keyword in SCHEMA_MAP_KEYWORDS:
        if keyword in schema:
            result[keyword] = {
                name: transform(name, child) for name, child in sorted(schema[keyword].items())
            }
    for keyword in SCHEMA_LIST_KEYWORDS:
        if keyword in schema:
            result[keyword] = [transform(f"{keyword}{i}", option) for i, option in enumerate(schema[keyword])]
    for keyword in SCHEMA_KEYWORDS:
        if isinstance(schema.get(keyword), dict):
            result[keyword] = transform(keyword, schema[keyword])
    return result


def strip_descriptions(schema: Schema) -> Schema:
    stripped = map_children(schema, lambda _name, child: strip_descriptions(child))
    stripped.pop("description", None)
    return stripped


def count_subtrees(schema: Schema, counts: Counter) -> None:
    counts[canonical(schema)] += 1
    for _name, child in child_schemas(schema):
        count_subtrees(child, counts)


def share_repeats(root: Schema) -> Schema:
    """`root` with each repeated subtree moved to `$defs` once and referenced where it was."""
    counts: Counter = Counter()
    count_subtrees(root, counts)
    names: dict[str, str] = {}  # canonical subtree -> $defs name
    definitions: dict[str, Schema] = {}

    def visit(name: str, schema: Schema, parent_name: str) -> Schema:
        key = canonical(schema)
        if counts[key] < 2 or len(key) < MIN_SHARED_CHARS:
            return map_children(schema, lambda child_name, child: visit(child_name, child, name))
        if key not in names:
            base = f"{parent_name}Item" if name == "items" else name
            unique, suffix = base, 2
            while unique in definitions:
                unique, suffix = f"{base}{suffix}", suffix + 1
            names[key] = unique
            definitions[unique] = {}  # reserve the name before visiting the children
            definitions[unique] = map_children(
                schema, lambda child_name, child: visit(child_name, child, name)
            )
        return {"$ref": f"#/$defs/{names[key]}"}

    shared = visit("root", root, "")
    return inline_single_use(shared, definitions)


def count_refs(node: object, uses: Counter) -> None:
    if isinstance(node, dict):
        if "$ref" in node:
            uses[node["$ref"].removeprefix("#/$defs/")] += 1
        for value in node.values():
            count_refs(value, uses)
    elif isinstance(node, list):
        for value in node:
            count_refs(value, uses)


def inline_refs(node: object, names: set[str], definitions: dict[str, Schema]) -> object:
    """`node` with each `$ref` to one of `names` replaced by the definition itself."""
    if isinstance(node, dict):
        ref = node.get("$ref", "").removeprefix("#/$defs/")
        if ref in names:
            return inline_refs(definitions[ref], names, definitions)
        return {key: inline_refs(value, names, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [inline_refs(value, names, definitions) for value in node]
    return node


def inline_single_use(root: Schema, definitions: dict[str, Schema]) -> Schema:
    """Put back the $defs used once only (they repeated only inside another shared subtree)."""
    while True:
        uses: Counter = Counter()
        for node in (root, *definitions.values()):
            count_refs(node, uses)
        single = {name for name in definitions if uses[name] == 1}
        if not single:
            break
        root = inline_refs(root, single, definitions)
        definitions = {
            name: inline_refs(body, single, definitions)
            for name, body in definitions.items()
            if name not in single
        }
    return {**root, "$defs": dict(sorted(definitions.items()))} if definitions else root


def served_schema(crd: dict, version: str = VERSION) -> Schema:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            if not entry.get("served"):
                raise SystemExit(f"{crd['metadata']['name']}: version {version} is not served")
            return entry["schema"]["openAPIV3Schema"]
    raise SystemExit(f"{crd['metadata']['name']}: no version {version}")


def extract(crd_path: Path) -> Schema:
    crd = yaml.safe_load(crd_path.read_text())
    schema = share_repeats(strip_descriptions(served_schema(crd)))
    header = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"openAPIV3Schema of {crd['spec']['group']}/{VERSION} {crd['spec']['names']['kind']} from "
            f"KubeRay's CRD {crd_path.name} (controller-gen "
            f"{crd['metadata'].get('annotations', {}).get('controller-gen.kubebuilder.io/version', '?')}), "
            "descriptions dropped, repeated subtrees shared under $defs; "
            "regenerate with cluster/kuberay/schema/extract.py"
        ),
    }
    return {**header, **schema}


def main(argv: list[str]) -> int:
    crd_dir = Path(argv[0]) if argv else DEFAULT_CRD_DIR
    for name, filename in CRDS.items():
        schema = extract(crd_dir / filename)
        target = HERE / f"{name}.schema.json"
        target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{target}: {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
