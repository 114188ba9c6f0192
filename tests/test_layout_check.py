"""--sp / --cfg-parallel against the model and the cluster, before any gang starts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cogdist.engine import replica_layout
from cogdist.errors import UsageError
from cogdist.executor.cluster import Cluster, Node
from cogdist.models.layout import check_layout
from cogdist.models.registry import PRESETS
from cogdist.options import RenderOptions


@pytest.mark.parametrize(
    "model,sp,ok",
    [
        ("THUDM/CogVideoX-5b", 8, True),  # 48 heads
        ("THUDM/CogVideoX-2b", 4, True),  # 30 heads: uneven, pads 2 onto shares of 8
        ("THUDM/CogVideoX-2b", 16, False),  # would pad 2 onto shares of 2
        ("THUDM/CogView4-6B", 32, True),
        ("THUDM/CogView4-6B", 33, False),
        ("tiny-cogview4", 3, True),
        ("tiny-cogview4", 4, False),
    ],
)
def test_heads_bound_the_degree(model, sp, ok):
    if ok:
        check_layout(PRESETS[model], sp, cfg_parallel=False)
    else:
        with pytest.raises(UsageError, match="attention heads"):
            check_layout(PRESETS[model], sp, cfg_parallel=False)


def test_a_gang_must_fit_one_node():
    check_layout(PRESETS["THUDM/CogVideoX-5b"], 4, cfg_parallel=True, gpus_per_node=8)
    with pytest.raises(UsageError, match="needs 8 GPUs in one node.*has 4"):
        check_layout(PRESETS["THUDM/CogVideoX-5b"], 4, cfg_parallel=True, gpus_per_node=4)


def cluster(*gpus: float, owned: bool = False, cpus: float = 32) -> Cluster:
    """A cluster of nodes with these GPUs (and `cpus` CPUs each)."""
    nodes = tuple(Node(f"n{i}", "127.0.0.1", 1, cpus, g) for i, g in enumerate(gpus))
    return Cluster(
        "x",
        owned,
        cpus=cpus * len(gpus),
        gpus=sum(gpus),
        max_node_cpus=cpus,
        start_seconds=0,
        max_node_gpus=max(gpus, default=0),
        nodes=nodes,
    )


def test_replicas_divide_the_gpus_by_the_gang_size():
    options = RenderOptions("m", "THUDM/CogVideoX-5b", "o", sp=2, cfg_parallel=True)
    layout = replica_layout(options, PRESETS["THUDM/CogVideoX-5b"], cluster(8, 8))
    assert (layout.replicas, layout.gang.size, layout.gang.gpus_per_member) == (4, 4, 1.0)
    assert layout.follows_cluster and layout.needs == "a node with 4 GPUs for a gang of --sp 2 --cfg-parallel"
    # A gang never spans nodes: two nodes of 3 GPUs hold no gang of 4.
    assert layout.capacity(list(cluster(3, 3).nodes)) == 0
    assert layout.capacity([*cluster(8, 4).nodes, Node("d", "h", 1, 32, 8, draining=True)]) == 3
    capped = replica_layout(replace(options, max_replicas=2), PRESETS["THUDM/CogVideoX-5b"], cluster(8, 8))
    assert capped.replicas == 2


def test_a_fixed_count_and_the_embedded_instance_do_not_follow_the_cluster():
    spec = PRESETS["tiny-cogview4"]
    fixed = replica_layout(RenderOptions("m", "tiny-cogview4", "o", replicas=3), spec, cluster(1, 1))
    assert (fixed.replicas, fixed.follows_cluster) == (3, False)
    embedded = replica_layout(RenderOptions("m", "tiny-cogview4", "o"), spec, cluster(2, owned=True))
    assert (embedded.replicas, embedded.follows_cluster) == (2, False)
    # CPUs: today's two gangs sharing the machine, unless --cpus-per-worker sizes a gang.
    cpu = replica_layout(RenderOptions("m", "tiny-cogview4", "o"), spec, cluster(0, 0, cpus=8))
    assert (cpu.replicas, cpu.follows_cluster, cpu.gang.cpus_per_member) == (2, False, 4.0)
    sized = replica_layout(
        RenderOptions("m", "tiny-cogview4", "o", cpus_per_worker=2), spec, cluster(0, 0, cpus=8)
    )
    assert (sized.replicas, sized.follows_cluster, sized.gang.gpus_per_member) == (8, True, 0.0)


@pytest.mark.parametrize(
    "model,device,gpus,owned,expected",
    [
        ("tiny-cogview4", "auto", 0, False, "cpu"),  # a small model renders on CPUs when no GPU is there
        ("tiny-cogview4", "auto", 1, False, "gpu"),  # ... and on GPUs whenever there are some
        ("THUDM/CogVideoX-5b", "auto", 0, False, "gpu"),  # never on CPUs: it waits for GPUs
        ("THUDM/CogVideoX-5b", "auto", 0, True, "refused"),  # the embedded instance gets none: refused
        ("tiny-cogview4", "gpu", 0, False, "gpu"),
        ("tiny-cogview4", "gpu", 0, True, "refused"),
        ("THUDM/CogVideoX-5b", "cpu", 4, False, "cpu"),  # asked for
    ],
)
def test_device_auto_never_puts_a_large_model_on_cpus(model, device, gpus, owned, expected):
    options = RenderOptions("m", model, "o", device=device)
    where = cluster(gpus, owned=owned)
    if expected == "refused":
        with pytest.raises(UsageError, match="no GPU.*--device cpu"):
            replica_layout(options, PRESETS[model], where)
        return
    layout = replica_layout(options, PRESETS[model], where)
    assert ("gpu" if layout.gang.gpus_per_member else "cpu") == expected


def test_parameters_come_from_the_transformer_config(tmp_path):
    from cogdist.models.spec import estimate_parameters

    # CogVideoX-5b's transformer config: ~4.8B by the estimate (5.6B with its embeddings).
    assert (
        4e9
        < estimate_parameters({"num_layers": 42, "num_attention_heads": 48, "attention_head_dim": 64})
        < 6e9
    )
    assert PRESETS["tiny-cogview4"].fits_on_cpus and not PRESETS["THUDM/CogView4-6B"].fits_on_cpus
