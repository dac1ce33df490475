"""Query tiles and haloed key blocks for exact, undilated neighborhood attention.

Each axis of length L is cut into tiles of T queries. All windows of a tile lie inside one key
block of `Bk = min(T + K - 1, L)` keys (windows shift inward at borders, so the block is clamped
into the axis too; docs/neighborhood-attention.md section 1). Attention of a tile over its block,
with -inf outside each query's window and the RPB added inside it, is exactly neighborhood
attention. Tiles whose (mask, RPB index) pattern is identical form a *class*: all interior tiles
share one, only border tiles differ, so the bias is stored per class pair, never per tile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .windows import bias_index, window_start


@dataclass(frozen=True)
class AxisTiling:
    """Tiling of one axis.

    Attributes:
        length: Axis length L.
        kernel_size: Window size K.
        tile: Queries per tile T (<= L).
        num_tiles: ceil(L / T); queries past L are padding and their outputs are dropped.
        block: Keys per block Bk.
        key_index: [num_tiles, Bk] long, key positions of each tile's block.
        tile_class: [num_tiles] long, class of each tile.
        class_valid: [num_classes, T, Bk] bool, key inside the query's window.
        class_rpb_index: [num_classes, T, Bk] long, `key - query + K - 1` clamped to [0, 2K-2].
    """

    length: int
    kernel_size: int
    tile: int
    num_tiles: int
    block: int
    key_index: torch.Tensor
    tile_class: torch.Tensor
    class_valid: torch.Tensor
    class_rpb_index: torch.Tensor


@functools.lru_cache(maxsize=512)
def axis_tiling(length: int, kernel_size: int, tile: int, device: torch.device) -> AxisTiling:
    """Build (and cache) the tiling of one axis; see the module docstring."""
    tile = min(tile, length)
    num_tiles = -(-length // tile)
    block = min(tile + kernel_size - 1, length)
    half = kernel_size // 2
    tile_start = torch.arange(num_tiles) * tile
    block_start = (tile_start - half).clamp(0, length - block)
    key_index = block_start[:, None] + torch.arange(block)  # [nt, Bk]
    query = tile_start[:, None] + torch.arange(tile)  # [nt, T]
    start = window_start(query, length, kernel_size)[..., None]  # [nt, T, 1]
    key = key_index[:, None, :]  # [nt, 1, Bk]
    valid = (key >= start) & (key < start + kernel_size)
    # Clamped: keys of the block outside a query's window are masked but must index in bounds.
    rpb_index = bias_index(key, query[..., None], kernel_size).clamp(0, 2 * kernel_size - 2)
    patterns = torch.cat([valid.flatten(1).long(), rpb_index.flatten(1)], dim=1)
    unique, tile_class = torch.unique(patterns, dim=0, return_inverse=True)
    size = tile * block
    return AxisTiling(
        length=length,
        kernel_size=kernel_size,
        tile=tile,
        num_tiles=num_tiles,
        block=block,
        key_index=key_index.to(device),
        tile_class=tile_class.to(device),
        class_valid=unique[:, :size].view(-1, tile, block).bool().to(device),
        class_rpb_index=unique[:, size:].view(-1, tile, block).to(device),
    )


def class_bias(
    rows: AxisTiling, cols: AxisTiling, rpb: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive bias (RPB inside the window, -inf outside) for every pair of tile classes.

    Args:
        rows, cols: Tilings of the two axes.
        rpb: [heads, 2Kh-1, 2Kw-1] or None.
        dtype: Dtype of the result.

    Returns:
        [row_classes, col_classes, heads or 1, Tr * Tc, Bkr * Bkc].
    """
    valid = (
        rows.class_valid[:, None, :, None, :, None] & cols.class_valid[None, :, None, :, None, :]
    )  # [ncr, ncc, Tr, Tc, Bkr, Bkc]
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    mask = mask.masked_fill(~valid, float('-inf')).unsqueeze(2)
    if rpb is None:
        bias = mask
    else:
        row_index = rows.class_rpb_index[:, None, :, None, :, None]
        col_index = cols.class_rpb_index[None, :, None, :, None, :]
        bias = rpb.to(dtype)[:, row_index, col_index].movedim(0, 2) + mask
    num_row_classes, num_col_classes, heads = bias.shape[:3]
    return bias.reshape(
        num_row_classes, num_col_classes, heads, rows.tile * cols.tile, rows.block * cols.block
    )
