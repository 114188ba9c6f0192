"""Distributed tiled VAE decode equals single-process tiled decode, on real gloo gangs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderTiny

from cogdist.models.cogvideox import runner as cogvideox
from cogdist.models.cogview4 import runner as cogview4
from cogdist.parallel.group import GangGroup, Layout
from cogdist.parallel.vae import apply_distributed_vae_decode
from tests.distributed import run_gang

# The tests share a module fixture: one test process runs them all.
pytestmark = pytest.mark.xdist_group("vae-gang")


def _autoencoder_kl() -> AutoencoderKL:
    """The tiny CogView4 VAE: 64 px tiles of 8 latents."""
    return cogview4.build_tiny(0).vae


def _cogvideox_vae() -> AutoencoderKLCogVideoX:
    """The tiny CogVideoX VAE: 48x40 px tiles of 6x5 latents."""
    return cogvideox.build_tiny("t2v", 0).vae


# (VAE builder, latent shape, decoder calls per tile). The AutoencoderKL latents are a 128x192
# image: a 3x4 grid of tiles. The CogVideoX latents are 5 frames (two frame batches per tile,
# 3 + 2, so the conv cache carries between them) of 80x80 px: a 2x3 grid of tiles.
CASES = {
    "autoencoder_kl": (_autoencoder_kl, (1, 4, 16, 24), 1),
    "cogvideox": (_cogvideox_vae, (1, 4, 5, 10, 10), 2),
}
GANG_SIZE = 3
"""One gang of three ranks serves both sizes: ranks 0 and 1 also form a group of two."""
SIZES = (2, 3)


class _CountCalls:
    """Counts calls of a module's forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._forward = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._forward(*args, **kwargs)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _decode_on_gang(gang: GangGroup) -> dict[str, dict]:
    """Every case on this rank: stock tiled decode, then the distributed one over groups of 3, 2, 1."""
    # Group creation is collective over the world: before any rank takes its own path.
    groups = {GANG_SIZE: dist.group.WORLD, 2: dist.new_group([0, 1]), 1: dist.new_subgroups(group_size=1)[0]}
    sizes = [1, 2, GANG_SIZE] if gang.rank < 2 else [1, GANG_SIZE]
    results = {}
    for name, (build, shape, calls_per_tile) in CASES.items():
        z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        vae = build()
        counter = _CountCalls(vae.decoder)
        result = {"calls_per_tile": calls_per_tile}
        with torch.no_grad():
            result["expected"] = vae.tiled_decode(z).sample
            result["tiles"] = counter.take() // calls_per_tile
            vae.disable_tiling()
            result["untiled_differs"] = not torch.equal(vae.decode(z).sample, result["expected"])
            counter.take()

            for size in sizes:
                apply_distributed_vae_decode(vae, groups[size])
                result[size] = {"distributed": vae.tiled_decode(z).sample, "calls": counter.take()}
            result["solo_exact"] = torch.equal(result[1]["distributed"], result["expected"])

            # With the gang's group applied last: the plain tuple, and `decode` with tiling on.
            (as_tuple,) = vae.tiled_decode(z, return_dict=False)
            counter.take()
            result["tuple_equal"] = torch.equal(as_tuple, result[GANG_SIZE]["distributed"])
            vae.enable_tiling()
            result["through_decode"] = vae.decode(z).sample
            result["decode_calls"] = counter.take()
        results[name] = result
    return results


@pytest.fixture(scope="module")
def gang_results() -> dict[int, dict[str, dict]]:
    """One gang runs every case; the tests share it (and its failure)."""
    return run_gang(Layout(sp=GANG_SIZE), _decode_on_gang)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_distributed_tiled_decode_equals_single_process(gang_results: dict, case: str, size: int) -> None:
    results = gang_results
    assert sorted(results) == list(range(GANG_SIZE))
    tiles = results[0][case]["tiles"]
    assert tiles > size, "the latents must give every rank several tiles"
    reference = results[0][case][size]["distributed"]
    for rank in range(size):
        result = results[rank][case]
        assert result["tiles"] == tiles
        distributed = result[size]["distributed"]
        assert distributed.shape == result["expected"].shape
        difference = (distributed - result["expected"]).abs().max().item()
        assert difference <= 1e-5, f"rank {rank}: max abs difference {difference}"
        assert torch.equal(distributed, reference), f"rank {rank} differs from rank 0"
        # Round-robin: rank r decodes tiles r, r + size, ... and no others.
        assert result[size]["calls"] == len(range(rank, tiles, size)) * result["calls_per_tile"]
    if size == 2:
        assert 2 not in results[2][case], "rank 2 is outside the group of two"


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_with_tiling_takes_the_distributed_path(gang_results: dict, case: str) -> None:
    for rank, by_case in gang_results.items():
        result = by_case[case]
        assert result["untiled_differs"], "a whole decode must differ, or tiling proves nothing"
        assert result["decode_calls"] == result[GANG_SIZE]["calls"] > 0
        assert torch.equal(result["through_decode"], result[GANG_SIZE]["distributed"]), f"rank {rank}"
        assert result["tuple_equal"], f"rank {rank}: return_dict=False differs"


@pytest.mark.parametrize("case", sorted(CASES))
def test_group_of_one_is_stock_tiled_decode(gang_results: dict, case: str) -> None:
    for rank, by_case in gang_results.items():
        result = by_case[case]
        assert result[1]["calls"] == result["tiles"] * result["calls_per_tile"]
        assert result["solo_exact"], f"rank {rank}"


class _CustomAutoencoderKL(AutoencoderKL):
    pass


@pytest.mark.parametrize("vae_class", [AutoencoderTiny, _CustomAutoencoderKL])
def test_other_vae_classes_are_refused(vae_class: type) -> None:
    vae = vae_class()
    with pytest.raises(TypeError, match=vae_class.__name__):
        apply_distributed_vae_decode(vae, None)
    assert "tiled_decode" not in vars(vae)
