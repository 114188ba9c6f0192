"""Distributed tiled VAE decoding: the tiles of one tiled decode spread over a gang's ranks.

Tiled decoding splits the latents into overlapping tiles, decodes each tile alone and blends the
overlaps. The tiles are independent, so the ranks of a gang (which all hold the same latents after
denoising) can each decode a share of them, gather every decoded tile and blend them alike. The
tile grid, the per-tile submodule calls and the blending are exactly diffusers' own, so every rank
returns what single-process `tiled_decode` returns, bit for bit on the same hardware.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from diffusers.models.autoencoders.vae import DecoderOutput

from cogdist.models.registry import tiled_decode_kind

TileDecoder = Callable[[int, int], torch.Tensor]
"""Decodes the tile whose latent top-left corner is at (row, column)."""


def apply_distributed_vae_decode(vae: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Make `vae.tiled_decode` (instance attribute) spread its tiles over `group`'s ranks.

    `vae.decode` reaches it whenever tiling is enabled and the latents exceed one tile, so the
    pipelines need no change. It is a collective: every rank of `group` must decode latents of
    the same shape at the same time, and every rank gets the whole decoded sample back, since every
    rank's pipeline goes on after decoding. `del vae.tiled_decode` restores the stock method.
    """
    # Which mirror of diffusers' loop applies is the VAE's family's declaration (`vae_tiles`),
    # by exact class name: a subclass may decode its tiles differently from the code mirrored here.
    kind = tiled_decode_kind(type(vae).__name__)
    if kind not in TILED_DECODES:
        raise TypeError(f"distributed VAE decode has no tiled decode for {type(vae).__name__}")
    tiled_decode = TILED_DECODES[kind]

    def distributed_tiled_decode(z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return tiled_decode(vae, group, z, return_dict)

    vae.tiled_decode = distributed_tiled_decode


# The two functions below mirror the loop structure of diffusers' `tiled_decode` of a VAE class
# (tile origins, tile slicing, submodule calls, blend order and crops) so that the result is
# identical; only the decoding of the tiles is shared out across the ranks.


def _tiled_decode_2d(
    vae: torch.nn.Module, group: dist.ProcessGroup, z: torch.Tensor, return_dict: bool
) -> DecoderOutput | tuple:
    overlap_size = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))
    blend_extent = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    row_limit = vae.tile_sample_min_size - blend_extent

    def decode_tile(i: int, j: int) -> torch.Tensor:
        tile = z[:, :, i : i + vae.tile_latent_min_size, j : j + vae.tile_latent_min_size]
        if vae.config.use_post_quant_conv:
            tile = vae.post_quant_conv(tile)
        return vae.decoder(tile)

    rows = _decode_tiles(
        group,
        range(0, z.shape[2], overlap_size),
        range(0, z.shape[3], overlap_size),
        decode_tile,
        z.device,
    )

    # blend_v/blend_h write into their second argument, so a tile above or to the left is used
    # already blended with its own neighbours, as in diffusers.
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_extent)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_extent)
            result_row.append(tile[:, :, :row_limit, :row_limit])
        result_rows.append(torch.cat(result_row, dim=3))
    dec = torch.cat(result_rows, dim=2)

    if not return_dict:
        return (dec,)
    return DecoderOutput(sample=dec)


def _tiled_decode_3d_causal(
    vae: torch.nn.Module, group: dist.ProcessGroup, z: torch.Tensor, return_dict: bool
) -> DecoderOutput | tuple:
    num_frames, height, width = z.shape[2:]
    overlap_height = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height))
    overlap_width = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width))
    blend_extent_height = int(vae.tile_sample_min_height * vae.tile_overlap_factor_height)
    blend_extent_width = int(vae.tile_sample_min_width * vae.tile_overlap_factor_width)
    row_limit_height = vae.tile_sample_min_height - blend_extent_height
    row_limit_width = vae.tile_sample_min_width - blend_extent_width
    frame_batch_size = vae.num_latent_frames_batch_size

    def decode_tile(i: int, j: int) -> torch.Tensor:
        # One spatial tile over all its frame batches: the causal convolutions carry their cache
        # from one batch of the tile to the next, so the batches of a tile stay on one rank.
        num_batches = max(num_frames // frame_batch_size, 1)
        conv_cache = None
        time = []
        for k in range(num_batches):
            remaining_frames = num_frames % frame_batch_size
            start_frame = frame_batch_size * k + (0 if k == 0 else remaining_frames)
            end_frame = frame_batch_size * (k + 1) + remaining_frames
            tile = z[
                :,
                :,
                start_frame:end_frame,
                i : i + vae.tile_latent_min_height,
                j : j + vae.tile_latent_min_width,
            ]
            if vae.post_quant_conv is not None:
                tile = vae.post_quant_conv(tile)
            tile, conv_cache = vae.decoder(tile, conv_cache=conv_cache)
            time.append(tile)
        return torch.cat(time, dim=2)

    rows = _decode_tiles(
        group, range(0, height, overlap_height), range(0, width, overlap_width), decode_tile, z.device
    )

    # In-place blending, as in the 2D decode above.
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_extent_height)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_extent_width)
            result_row.append(tile[:, :, :, :row_limit_height, :row_limit_width])
        result_rows.append(torch.cat(result_row, dim=4))
    dec = torch.cat(result_rows, dim=3)

    if not return_dict:
        return (dec,)
    return DecoderOutput(sample=dec)


TILED_DECODES: dict[
    str, Callable[[torch.nn.Module, dist.ProcessGroup, torch.Tensor, bool], DecoderOutput | tuple]
] = {
    "2d": _tiled_decode_2d,
    "3d-causal": _tiled_decode_3d_causal,
}
"""The tiled decodes a family's `vae_tiles` can name:
- "2d": diffusers' `AutoencoderKL.tiled_decode` (one image's latents in overlapping 2D tiles);
- "3d-causal": `AutoencoderKLCogVideoX.tiled_decode` (spatial tiles over all their frame batches,
  whose causal convolutions carry a cache from one batch to the next)."""


def _decode_tiles(
    group: dist.ProcessGroup,
    row_origins: range,
    column_origins: range,
    decode_tile: TileDecoder,
    device: torch.device,
) -> list[list[torch.Tensor]]:
    """Decode this rank's share of the tile grid and gather the whole grid, as rows of tiles.

    Tiles go round-robin by row-major index: the smaller tiles of the last row and column then
    spread over the ranks instead of all landing on the last one.
    """
    rank = dist.get_rank(group)
    world_size = dist.get_world_size(group)
    origins = [(i, j) for i in row_origins for j in column_origins]
    mine = [decode_tile(i, j) for i, j in origins[rank::world_size]]

    tiles = mine
    if world_size > 1:
        tiles = [None] * len(origins)
        for source, decoded in enumerate(_all_gather_tiles(group, mine, device)):
            tiles[source::world_size] = decoded
        tiles[rank::world_size] = mine  # this rank's own tensors rather than their copies

    columns = len(column_origins)
    return [tiles[start : start + columns] for start in range(0, len(tiles), columns)]


def _all_gather_tiles(
    group: dist.ProcessGroup, mine: list[torch.Tensor], device: torch.device
) -> list[list[torch.Tensor]]:
    """Every rank's decoded tiles, in order, gathered to every rank.

    The tiles stay on the latents' device: shapes and dtypes (a few bytes) go through
    `all_gather_object`, then each rank's tiles, packed as raw bytes into one buffer padded to the
    longest, go through one `all_gather`. So NCCL gathers GPU tensors directly and gloo CPU tensors,
    without pickling the pixels, and bytes travel whatever the dtype (bfloat16 on gloo included).
    """
    world_size = dist.get_world_size(group)
    layouts: list[list[tuple[tuple[int, ...], torch.dtype]] | None] = [None] * world_size
    dist.all_gather_object(layouts, [(tuple(tile.shape), tile.dtype) for tile in mine], group=group)

    sizes = [sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout) for layout in layouts]
    longest = max(sizes)
    packed = torch.zeros(longest, dtype=torch.uint8, device=device)
    offset = 0
    for tile in mine:
        data = tile.detach().contiguous().view(-1).view(torch.uint8)
        packed[offset : offset + data.numel()] = data
        offset += data.numel()
    buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world_size)]
    dist.all_gather(buffers, packed, group=group)

    gathered = []
    for buffer, layout in zip(buffers, layouts):
        tiles = []
        offset = 0
        for shape, dtype in layout:
            size = math.prod(shape) * dtype.itemsize
            tiles.append(buffer[offset : offset + size].view(dtype).view(shape))
            offset += size
        gathered.append(tiles)
    return gathered
