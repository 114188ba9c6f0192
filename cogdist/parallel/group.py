"""The gang's process group and device mesh.

A gang of `cfg * sp` ranks forms one `torch.distributed` group (NCCL on GPU, gloo on CPU) and a
mesh with dimensions ("cfg", "ring", "ulysses"): the CFG halves outermost, so ranks 0..sp-1 hold
the conditional half and world rank 0 (the writer) is in it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

INIT_TIMEOUT_SECONDS = 60.0
"""How long ranks wait for each other to form the group: a member that never arrives fails fast."""


@dataclass(frozen=True)
class Layout:
    """How a gang's ranks divide the work of one sample."""

    sp: int = 1
    """Sequence-parallel degree: ranks sharing one sample's tokens."""
    cfg: int = 1
    """2 when the conditional and unconditional passes run on different ranks."""

    @property
    def world_size(self) -> int:
        return self.sp * self.cfg

    def __post_init__(self) -> None:
        if self.sp < 1 or self.cfg not in (1, 2):
            raise ValueError(f"invalid layout sp={self.sp} cfg={self.cfg}")


@dataclass
class GangGroup:
    """One rank's view of its gang's torch.distributed group (worker side): the world group, the
    mesh and its place in both. The driver's side of a gang is `cogdist.executor.gang.ReplicaGang`."""

    layout: Layout
    rank: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.layout.sp

    def cfg_group(self) -> dist.ProcessGroup:
        if self.mesh is None:
            raise ValueError("a single-rank gang has no CFG group")
        return self.mesh["cfg"].get_group()


def rendezvous_address() -> tuple[str, int]:
    """An address and free port on this node for rank 0 to host the group's store."""
    host = socket.gethostbyname(socket.gethostname())
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return host, port


def init_gang(
    layout: Layout,
    rank: int,
    address: tuple[str, int],
    device: torch.device,
    init_timeout: float = INIT_TIMEOUT_SECONDS,
    *,
    collective_timeout: float,
) -> GangGroup:
    """Join the gang's process group and build its mesh; a single rank needs neither.

    `collective_timeout`: how long a collective may wait for a peer (--collective-timeout: long
    enough for a rank-0-only stage, short enough that a hung peer fails the gang within minutes)."""
    if layout.world_size == 1:
        return GangGroup(layout, 0, device, None)
    host, port = address
    # "cpu:gloo" on CPU: uneven (Ulysses-anything) splits need the device-qualified backend.
    backend = "cuda:nccl" if device.type == "cuda" else "cpu:gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=layout.world_size,
        timeout=timedelta(seconds=init_timeout),
        device_id=device if device.type == "cuda" else None,
    )
    # Forming the group only proves the store was reached; a barrier proves every peer is there.
    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=collective_timeout))
    mesh = init_device_mesh(
        device.type, (layout.cfg, 1, layout.sp), mesh_dim_names=("cfg", "ring", "ulysses")
    )
    return GangGroup(layout, rank, device, mesh)


def leave_gang() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
