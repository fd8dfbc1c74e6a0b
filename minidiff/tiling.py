"""Tiled processing of large images, as diffusers' VAE tiling: overlapping tiles, linearly cross-faded.

A VAE's memory grows with the image; tiling runs the encoder (or decoder) on fixed-size tiles that
overlap by a quarter, then stitches the outputs: where a tile overlaps the one above (left), the
first `blend` rows (columns) fade linearly from the neighbour's last ones to its own, and each tile
keeps its first `keep` rows and columns. diffusers blends in place in row-major order, so a tile
fades from neighbours that were themselves already blended; `tiled` does the same, and gives
diffusers' numbers. The seams are softened, not removed: a tiled result is not the untiled one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def blend_into(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Fade the first `extent` slices of `tile` along `dim` (2 = rows, 3 = columns) from the last ones of
    `prev`, in place: weight k / extent on the tile's own slice k."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64) / extent  # in float64, then cast, as diffusers' Python floats
    shape = [extent if d == dim else 1 for d in range(tile.ndim)]
    own, theirs = (r.to(tile.device, tile.dtype).view(shape) for r in (ramp, 1 - ramp))
    head = tile.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * theirs + head * own)


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, out_tile: int, overlap: float
) -> torch.Tensor:
    """fn(x) computed on `tile` x `tile` windows of x that start every tile * (1 - overlap) pixels; fn maps
    a full window to `out_tile` x `out_tile`. The outputs are blended over out_tile * overlap rows and
    columns and stitched, each keeping out_tile * (1 - overlap)."""
    step = int(tile * (1 - overlap))
    blend = int(out_tile * overlap)
    keep = out_tile - blend
    rows = [
        [fn(x[:, :, i : i + tile, j : j + tile]) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i > 0:
                blend_into(rows[i - 1][j], out, blend, dim=2)
            if j > 0:
                blend_into(row[j - 1], out, blend, dim=3)
    return torch.cat([torch.cat([out[:, :, :keep, :keep] for out in row], dim=3) for row in rows], dim=2)
