"""--sp / --cfg-parallel against the model and the cluster, before any gang starts."""

from __future__ import annotations

import pytest

from cogdist.engine import replica_layout
from cogdist.errors import UsageError
from cogdist.executor.cluster import Cluster
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


def test_replicas_divide_the_gpus_by_the_gang_size():
    cluster = Cluster("x", False, cpus=64, gpus=16, max_node_cpus=32, start_seconds=0, max_node_gpus=8)
    options = RenderOptions("m", "THUDM/CogVideoX-5b", "o", sp=2, cfg_parallel=True)
    replicas, spec = replica_layout(options, cluster)
    assert (replicas, spec.size, spec.gpus_per_member) == (4, 4, 1.0)
