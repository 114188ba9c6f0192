"""cluster/: the KubeRay manifests, checked against KubeRay's CRD schema as strictly as `kubectl
apply` checks them, and against what cogdist needs of a cluster; the Ray cluster-launcher config,
checked against Ray's own schema; the schema extraction script.

The CRD schemas ship in cluster/kuberay/schema/ (CI has no copy of KubeRay's CRDs). They are the
API server's schemas; `strict` adds what Kubernetes' strict field validation (kubectl's default)
adds on top: an unknown field is an error, not silently pruned.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray
import yaml

from cogdist.cli import build_parser
from cogdist.models.registry import resolve_model
from cogdist.options import RenderOptions
from jobs.render import arguments
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMA_DIR = KUBERAY / "schema"
CRD_SCHEMAS = {"RayCluster": "raycluster.schema.json", "RayJob": "rayjob.schema.json"}
LAUNCHER = CLUSTER / "launcher" / "aws.yaml"
SECRET_NAME = "cogdist-s3"
OBJECT_STORE_SCHEMES = ("s3", "gs")
# GPUs and vCPUs of the instance types a launcher GPU node type may use.
INSTANCE_TYPES = {
    "g5.12xlarge": (4, 48),
    "g5.48xlarge": (8, 192),
    "g6.12xlarge": (4, 48),
    "g6e.12xlarge": (4, 48),
    "p4d.24xlarge": (8, 96),
    "p5.48xlarge": (8, 192),
}

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The CRDs leave a resource's top-level metadata as a bare object (the API server checks it
# itself); these are the ObjectMeta fields a manifest in this repository may set.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 63},
        "namespace": {"type": "string", "pattern": DNS_SUBDOMAIN},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}
SECRET_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "Secret"},
        "metadata": OBJECT_META,
        "type": {"type": "string"},
        "immutable": {"type": "boolean"},
        "data": STRING_MAP,
        "stringData": STRING_MAP,
    },
    "additionalProperties": False,
}
QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i|[numkMGTPE])?$")
QUANTITY_FACTORS = {
    "": 1,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    **{f"{prefix}i": 1024 ** (power + 1) for power, prefix in enumerate("KMGTPE")},
}
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# -- loading and strict validation -------------------------------------------------------------


def kuberay_documents() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document under cluster/kuberay."""
    documents = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path.name, document))
    return documents


def document(kind: str) -> dict:
    """A fresh copy of the only document of `kind`."""
    (found,) = [doc for _name, doc in kuberay_documents() if doc["kind"] == kind]
    return found


def strict(schema: dict) -> dict:
    """`schema` with unknown fields refused wherever it lists the known ones, as the API server
    does under strict field validation (maps and preserve-unknown objects stay open)."""
    result = dict(schema)
    for keyword in ("properties", "patternProperties", "$defs"):
        if keyword in schema:
            result[keyword] = {name: strict(child) for name, child in schema[keyword].items()}
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in schema:
            result[keyword] = [strict(option) for option in schema[keyword]]
    for keyword in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(keyword), dict):
            result[keyword] = strict(schema[keyword])
    open_object = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
    if "properties" in schema and not open_object:
        result["additionalProperties"] = False
    return result


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    if kind not in CRD_SCHEMAS:
        return jsonschema.Draft202012Validator(SECRET_SCHEMA if kind == "Secret" else {"not": {}})
    schema = strict(json.loads((SCHEMA_DIR / CRD_SCHEMAS[kind]).read_text()))
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"] = {
        **schema["properties"],
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": kind},
        "metadata": OBJECT_META,
    }
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validation_errors(doc: dict) -> list[str]:
    errors = validator(doc.get("kind", "?")).iter_errors(doc)
    return sorted(
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors
    )


# -- reading a cluster spec --------------------------------------------------------------------


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def ray_groups(doc: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head group and every worker group."""
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def quantity(value: int | str) -> float:
    """A Kubernetes resource quantity ("160Gi", "500m", 4) as a number."""
    match = QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * QUANTITY_FACTORS[match.group(2) or ""]


def gpus_of(container: dict) -> tuple[int, int]:
    resources = container.get("resources", {})
    return (
        int(resources.get("limits", {}).get("nvidia.com/gpu", 0)),
        int(resources.get("requests", {}).get("nvidia.com/gpu", 0)),
    )


def render_options(job: dict) -> RenderOptions:
    """The RayJob's render, as jobs/render.py resolves it inside the head container."""
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", f"{image_workdir()}/jobs/render.py"], command
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in head.get("env", []) if "value" in item}
    args = build_parser().parse_args(arguments(command[2:], env))
    return RenderOptions(
        manifest=args.manifest,
        model=args.model,
        out=args.out,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        device=args.device,
        sp=args.sp,
        cfg_parallel=args.cfg_parallel,
    )


def dockerfile_ray_version() -> str:
    match = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu\b", dockerfile(), re.MULTILINE)
    assert match, "cluster/Dockerfile should build FROM a rayproject/ray GPU image"
    return match.group(1)


def image_workdir() -> str:
    match = re.search(r"^WORKDIR (\S+)", dockerfile(), re.MULTILINE)
    assert match, "cluster/Dockerfile names no WORKDIR"
    return match.group(1)


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


# -- the manifests against the CRD schema ------------------------------------------------------


def test_the_manifests_are_a_raycluster_a_rayjob_and_a_secret_template():
    kinds = sorted(doc["kind"] for _name, doc in kuberay_documents())
    assert kinds == ["RayCluster", "RayJob", "Secret"]


@pytest.mark.parametrize(
    "name,doc", kuberay_documents(), ids=[f"{name}:{doc['kind']}" for name, doc in kuberay_documents()]
)
def test_every_manifest_validates_strictly(name, doc):
    assert validation_errors(doc) == []


def rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def worker_container(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


MUTATIONS = {
    "misspelt backoffLimit": (
        "RayJob",
        lambda d: rename(d["spec"], "backoffLimit", "backoffLimt"),
        "backoffLimt",
    ),
    "replicas as a word": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
        "'two' is not of type 'integer'",
    ),
    "num-gpus as a number": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 4}),
        "4 is not of type 'string'",
    ),
    "misspelt field of the cluster": (
        "RayJob",
        lambda d: rename(d["spec"]["rayClusterSpec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        "enableInTreeAutoScaling",
    ),
    "misspelt field of a container": (
        "RayJob",
        lambda d: rename(worker_container(d), "resources", "resource"),
        "'resource' was unexpected",
    ),
    "misspelt field of a volume": (
        "RayCluster",
        lambda d: rename(
            d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"],
            "sizeLimit",
            "sizelimit",
        ),
        "'sizelimit' was unexpected",
    ),
    "memory in GB": (
        "RayCluster",
        lambda d: worker_container(d)["resources"]["limits"].update(memory="160GB"),
        "'160GB' does not match",
    ),
    "env entry without a name": (
        "RayJob",
        lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0].pop("name"),
        "'name' is a required property",
    ),
    "misspelt metadata": ("RayCluster", lambda d: rename(d["metadata"], "labels", "lables"), "lables"),
    "wrong apiVersion": ("RayJob", lambda d: d.update(apiVersion="ray.io/v2"), "'ray.io/v1' was expected"),
    "misspelt stringData": ("Secret", lambda d: rename(d, "stringData", "stringdata"), "stringdata"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_a_wrong_field_fails_validation(case):
    kind, mutate, expected = MUTATIONS[case]
    doc = copy.deepcopy(document(kind))
    assert validation_errors(doc) == []
    mutate(doc)
    errors = validation_errors(doc)
    assert any(expected in error for error in errors), errors


# -- what cogdist needs of the pods ------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_pod_templates_have_sized_ray_containers_and_a_memory_backed_dev_shm(kind):
    doc = document(kind)
    images = set()
    for group, spec in ray_groups(doc):
        pod = spec["template"]["spec"]
        shm_volumes = {
            volume["name"]: volume["emptyDir"]
            for volume in pod.get("volumes", [])
            if volume.get("emptyDir", {}).get("medium") == "Memory"
        }
        assert pod["containers"], group
        for container in pod["containers"]:
            images.add(container["image"])
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            for resource in ("cpu", "memory"):
                # requests == limits: a Guaranteed pod, and Ray sizes itself from the limits.
                assert quantity(limits[resource]) == quantity(requests[resource]) > 0, (group, resource)
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert len(mounts) == 1 and mounts[0]["name"] in shm_volumes, (group, container["name"])
            shm_size = quantity(shm_volumes[mounts[0]["name"]]["sizeLimit"])
            # A Memory emptyDir counts against the limit; Docker's default 64 MiB starves Ray and NCCL.
            assert 2**30 <= shm_size < quantity(limits["memory"]), group
    assert len(images) == 1, images
    assert cluster_spec(doc)["rayVersion"] == dockerfile_ray_version()


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_the_head_ports_carry_the_names_kuberay_looks_up(kind):
    """KubeRay builds the head service from these ports and finds the dashboard, where a RayJob
    is submitted, by the port's name."""
    head = cluster_spec(document(kind))["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in head.get("ports", [])}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_a_gang_fits_one_worker_pod(kind):
    doc = document(kind)
    head_params = cluster_spec(doc)["headGroupSpec"]["rayStartParams"]
    assert head_params["num-gpus"] == "0"
    for container in cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"]:
        assert gpus_of(container) == (0, 0)
    workers = cluster_spec(doc)["workerGroupSpecs"]
    assert workers
    for group in workers:
        pod = group["template"]["spec"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        # The Ray container (the first one, by KubeRay's convention) holds the pod's GPUs.
        assert gpus_of(pod["containers"][0]) == (gpus, gpus) and gpus >= 1, group["groupName"]
        assert all(gpus_of(c) == (0, 0) for c in pod["containers"][1:])
        assert group.get("numOfHosts", 1) == 1  # a gang cannot span the hosts of a multi-host group
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), group["groupName"]


def test_the_rayjob_gangs_match_its_worker_pods():
    job = document("RayJob")
    options = render_options(job)
    options.check(resolve_model(options.model))  # cogdist's own up-front checks, no download
    (workers,) = cluster_spec(job)["workerGroupSpecs"]
    gpus_per_pod = int(workers["rayStartParams"]["num-gpus"])
    # All GPUs of one gang in one pod: STRICT_PACK can place nothing larger.
    assert options.gang_size == gpus_per_pod
    gangs_per_pod = gpus_per_pod // options.gang_size
    # The job follows its cluster (no fixed --replicas) and asks the autoscaler for no more gangs
    # than the worker group may grow to; the pods KubeRay starts first hold at least one gang.
    assert options.replicas is None and options.max_replicas is not None
    assert workers["maxReplicas"] * gangs_per_pod >= options.max_replicas
    assert workers["replicas"] * gangs_per_pod >= 1


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_autoscaling_bounds(kind):
    spec = cluster_spec(document(kind))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        # A GPU group may scale to zero: a job waits for its GPU pods (--device auto never renders
        # a real checkpoint on CPUs) and its pending gangs are what makes the autoscaler add them.
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] >= 1


def test_a_retried_rayjob_resumes_from_object_storage():
    job = document("RayJob")
    assert job["spec"]["backoffLimit"] > 0
    assert job["spec"]["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] >= 0
    options = render_options(job)
    # Each retry runs on a new cluster: only an object store outlives the pods.
    for uri in (options.out, options.manifest):
        assert urlparse(uri).scheme in OBJECT_STORE_SCHEMES and urlparse(uri).netloc, uri


# -- credentials -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_credentials_come_from_the_secret(kind):
    doc = document(kind)
    secret = document("Secret")
    assert secret["metadata"]["name"] == SECRET_NAME
    for group, spec in ray_groups(doc):
        for container in spec["template"]["spec"]["containers"]:
            sources = [
                item["secretRef"]["name"] for item in container.get("envFrom", []) if "secretRef" in item
            ]
            assert SECRET_NAME in sources, (group, container["name"])
            for item in container.get("env", []):
                if SECRET_ENV.search(item["name"]):
                    assert "value" not in item, f"{group}: {item['name']} is written in the manifest"
                if "value" in item and "://" in item["value"]:
                    parsed = urlparse(item["value"])
                    assert not (parsed.username or parsed.password), f"{item['name']} holds credentials"


def test_the_secret_template_holds_no_credentials():
    secret = document("Secret")
    values = secret["stringData"]
    # The variables pyarrow's S3 client reads (cogdist adds AWS_ENDPOINT_URL for other stores).
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(values)
    for name, value in values.items():
        if SECRET_ENV.search(name):
            assert value == "REPLACE_ME", name
    assert "data" not in secret
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".md", ".json", ".py", ""}:
            assert not AWS_KEY_ID.search(path.read_text()), path


# -- the image --------------------------------------------------------------------------------


def test_the_dockerfile_installs_cuda_torch_and_cogdist_where_the_manifests_look():
    text = dockerfile()
    assert re.search(
        r"pip install [^\n]*torch[^\n]*--index-url https://download\.pytorch\.org/whl/cu\d+", text
    )
    assert re.search(r"pip install [^\n]*-e \.", text)
    assert re.search(r"^COPY .*\bjobs \./jobs$", text, re.MULTILINE)
    assert (ROOT / "jobs" / "render.py").is_file()


# -- the cluster launcher ----------------------------------------------------------------------


def launcher_config() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_schema_errors(config: dict) -> list[str]:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return sorted(error.message for error in validator.iter_errors(config))


def test_the_launcher_config_validates_against_rays_schema():
    config = launcher_config()
    assert ray_schema_errors(config) == []
    # What `ray up` runs before it starts anything: defaults filled in, then validated.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_rays_schema_refuses_a_misspelt_launcher_field():
    config = launcher_config()
    gpu_type = next(name for name in config["available_node_types"] if name != config["head_node_type"])
    rename(config["available_node_types"][gpu_type], "min_workers", "min_worker")
    assert any("'min_worker' was unexpected" in error for error in ray_schema_errors(config))


def test_the_launcher_gpu_nodes_hold_a_whole_gang():
    config = launcher_config()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types
    for name, node_type in gpu_types.items():
        gpus, vcpus = INSTANCE_TYPES[node_type["node_config"]["InstanceType"]]
        # Advertising GPUs the instance lacks would let Ray place gangs that can never start.
        assert node_type["resources"]["GPU"] == gpus, name
        assert node_type["resources"].get("CPU", vcpus) <= vcpus, name
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
    assert sum(t["max_workers"] for t in gpu_types.values()) >= 1


def test_the_launcher_installs_cuda_torch_and_the_mounted_cogdist():
    config = launcher_config()
    (target,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    commands = "\n".join(config["setup_commands"])
    assert re.search(
        r"pip install [^\n]*torch[^\n]*--index-url https://download\.pytorch\.org/whl/cu\d+", commands
    )
    assert re.search(rf"pip install [^\n]*-e {re.escape(target)}$", commands, re.MULTILINE)
    assert ".venv" in config["rsync_exclude"]
    assert config["docker"]["image"].split(":")[1].startswith(dockerfile_ray_version())


# -- the schema extraction script --------------------------------------------------------------


def load_extract_script():
    spec = importlib.util.spec_from_file_location("kuberay_schema_extract", SCHEMA_DIR / "extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inline_definitions(node: object, definitions: dict) -> object:
    if isinstance(node, dict):
        if "$ref" in node:
            return inline_definitions(definitions[node["$ref"].removeprefix("#/$defs/")], definitions)
        return {key: inline_definitions(value, definitions) for key, value in node.items()}
    if isinstance(node, list):
        return [inline_definitions(value, definitions) for value in node]
    return node


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_the_shipped_schema_is_what_the_extract_script_writes(kind):
    """Sharing subtrees under $defs loses nothing: expanding the shipped file and sharing again
    gives the same file (CI has no CRDs; with them, `extract.py` regenerates these files)."""
    extract = load_extract_script()
    shipped = json.loads((SCHEMA_DIR / CRD_SCHEMAS[kind]).read_text())
    header = {key: shipped.pop(key) for key in ("$schema", "$comment")}
    assert f"ray.io/v1 {kind}" in header["$comment"]
    expanded = inline_definitions(
        {k: v for k, v in shipped.items() if k != "$defs"}, shipped.get("$defs", {})
    )
    assert "$ref" not in json.dumps(expanded)
    assert extract.strip_descriptions(expanded) == expanded
    assert extract.canonical(extract.share_repeats(expanded)) == extract.canonical(shipped)
    # Sharing is what keeps the shipped file small: the pod spec alone repeats 2 or 3 times.
    assert len(extract.canonical(expanded)) > 1.5 * len(extract.canonical(shipped))


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_token_auth_is_on_as_ray_starts_clusters(kind):
    # KubeRay keeps the token in a Secret and gives every Ray container RAY_AUTH_MODE/RAY_AUTH_TOKEN.
    assert cluster_spec(document(kind))["authOptions"] == {"mode": "token"}
