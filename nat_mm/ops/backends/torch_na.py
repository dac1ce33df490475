"""Pure-PyTorch neighborhood attention: exact, any device, autograd, memory near its inputs.

Undilated attention runs on query tiles with haloed key blocks (`tiling.py`); dilation is exact by
running it on every sub-lattice (`lattice.py`). `TiledAttention` walks the tiles in chunks of
tile rows with a hand-written backward that recomputes each chunk's probabilities, so neither
the K*K gather of the oracle nor the full tile logits are ever held in memory.

A tile computes logits for keys outside each query's window and masks them, so one NaN / inf key
or value would reach every query of its tiles (`-inf + nan`, `0 * nan`). Inputs that are not all
finite therefore take the explicit per-query gather of `nat_mm.ops.reference` instead (slow, K*K
times the memory of k and v under autograd): each query then sees only its own window, as in
docs/neighborhood-attention.md section 1. fp16 and bf16 run natively, on CPU too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..reference import na2d_reference
from .lattice import map_sub_lattices
from .tiling import AxisTiling, axis_tiling, class_bias

NAME = 'torch'

# Queries per tile side (adjusted per axis by `_axis_tile`). Measured on CPU, NAT-T stage 3,
# K = 7, fwd+bwd (tools/benchmark_na.py): tiles of 5-6 beat 4 (small matmuls) and 7-8 (more
# masked logits: (T + K - 1)^2 / K^2 per query).
DEFAULT_TILE = 6


def unavailable_reason() -> str | None:
    """Pure PyTorch is always available."""
    return None


def can_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> str | None:
    """The torch backend runs everything that passed input validation."""
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Neighborhood attention on validated inputs.

    Args:
        q, k, v: [B, H, W, heads, head_dim].
        kernel_size: (Kh, Kw), odd.
        dilation: (dh, dw).
        rpb: [heads, 2Kh-1, 2Kw-1] or None.
        scale: Logit scale applied to q.

    Returns:
        [B, H, W, heads, head_dim].
    """
    if not _all_finite(q, k, v, rpb):
        return _gather_attention(q, k, v, kernel_size, dilation, rpb, scale)

    def attend(q_sub: torch.Tensor, k_sub: torch.Tensor, v_sub: torch.Tensor) -> torch.Tensor:
        return tiled_attention(q_sub, k_sub, v_sub, kernel_size, rpb, scale, DEFAULT_TILE)

    return map_sub_lattices(q, k, v, dilation, attend)


# Gathered key (and value) elements per chunk of query rows on the non-finite path: bounds its
# memory without autograd (with autograd every chunk's gather is kept for the backward).
GATHER_ELEMENTS = 1 << 22


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """True if no tensor holds a NaN or an inf: one pass over each, one device sync in all."""
    checks = [torch.isfinite(x).all() for x in tensors if x is not None]
    return bool(torch.stack(checks).all())


def _gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Per-query attention by explicit gather (the oracle), in chunks of query rows."""
    batch, height, width, heads, head_dim = q.shape
    per_row = batch * width * heads * head_dim * kernel_size[0] * kernel_size[1]
    step = max(1, GATHER_ELEMENTS // max(1, per_row))
    rpb = rpb.to(q.dtype) if rpb is not None else None
    chunks = [
        na2d_reference(
            q, k, v, kernel_size, dilation, rpb, scale, query_rows=slice(start, start + step)
        )
        for start in range(0, height, step)
    ]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
    tile: int,
) -> torch.Tensor:
    """Undilated neighborhood attention by query tiles and haloed key blocks.

    Args:
        q, k, v: [N, H, W, heads, head_dim].
        kernel_size: (Kh, Kw).
        rpb: [heads, 2Kh-1, 2Kw-1] or None.
        scale: Logit scale.
        tile: Queries per tile side.

    Returns:
        [N, H, W, heads, head_dim].
    """
    _, height, width, _, _ = q.shape
    rows = axis_tiling(height, kernel_size[0], _axis_tile(height, kernel_size[0], tile), q.device)
    cols = axis_tiling(width, kernel_size[1], _axis_tile(width, kernel_size[1], tile), q.device)
    # [heads or 1, row classes, col classes, Tr * Tc, Bkr * Bkc]: small, differentiable in rpb.
    bias = class_bias(rows, cols, rpb, q.dtype).permute(2, 0, 1, 3, 4).contiguous()
    if not torch.is_grad_enabled():
        # No autograd node needed (inference, or inside TracedNeighborhoodAttention2D while
        # tracing, where the tracer cannot nest autograd Functions).
        return _untile(_tiled_forward(q, k, v, bias, rows, cols, scale), rows, cols)
    return TiledAttention.apply(q, k, v, bias, rows, cols, scale)


def _axis_tile(length: int, kernel_size: int, tile: int) -> int:
    """Tile size for one axis: the cheapest of tile - 1, tile, tile + 1 and (short axes) L.

    Cost = logits per query row along this axis: (padded queries) x (keys per block). Short axes
    (sub-lattices of large dilations: 7 to 11 rows for d = 28 at stage 1) then take one tile and
    no padded queries, e.g. L = 7: 7 x 7 instead of 12 x 7. Sizes far from `tile` are excluded
    because small matmuls run slowly, which this cost ignores.
    """
    candidates = {tile - 1, tile, tile + 1} | ({length} if length <= 2 * tile else set())

    def cost(size: int) -> int:
        return -(-length // size) * size * min(size + kernel_size - 1, length)

    return min((size for size in candidates if 1 <= size <= length), key=lambda s: (cost(s), -s))


class TiledAttention(torch.autograd.Function):
    """Tiled attention, flash-style: chunks of tile rows, probabilities recomputed in backward.

    Saves only q, k, v, the class bias table and the output, so memory stays near the size of
    the inputs; each chunk's logits hold about CHUNK_ELEMENTS values. Recomputing the softmax
    in backward (torch's fused kernel) measured faster than saving a log-sum-exp and
    exponentiating against it. The hand-written backward is not itself differentiable: with
    `create_graph=True` (double backward) the backward differentiates a plain-autograd replay
    of the forward instead.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        rows: AxisTiling,
        cols: AxisTiling,
        scale: float,
    ) -> torch.Tensor:
        out_tiles = _tiled_forward(q, k, v, bias, rows, cols, scale)
        ctx.save_for_backward(q, k, v, bias, out_tiles)
        ctx.tiling = (rows, cols, scale)
        return _untile(out_tiles, rows, cols)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias, out_tiles = ctx.saved_tensors
        rows, cols, scale = ctx.tiling
        if torch.is_grad_enabled():  # create_graph=True
            needs = ctx.needs_input_grad
            return _replay_backward(q, k, v, bias, rows, cols, scale, grad_out, needs)
        q_tiles = _query_tiles(q * scale, rows, cols)
        grad_tiles = _query_tiles(grad_out, rows, cols)
        delta = (grad_tiles * out_tiles).sum(-1)  # [N, heads, nth, ntw, Tr * Tc]
        k_maps, v_maps = _heads_first(k), _heads_first(v)
        grad_q_tiles = torch.empty_like(q_tiles)
        grad_k_maps, grad_v_maps = torch.zeros_like(k_maps), torch.zeros_like(v_maps)
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        for chunk in _chunks(q_tiles, rows, cols):
            k_blocks = _key_blocks(k_maps, rows, cols, chunk)
            v_blocks = _key_blocks(v_maps, rows, cols, chunk)
            logits = _logits(q_tiles[:, :, chunk], k_blocks, bias, rows, cols, chunk)
            probs = logits.softmax(dim=-1)
            del logits
            grad_chunk = grad_tiles[:, :, chunk]
            _add_key_blocks(grad_v_maps, probs.transpose(-1, -2) @ grad_chunk, rows, cols, chunk)
            # d logits = P * (dO . V^T - rowsum(dO * O)), in place.
            grad_logits = grad_chunk @ v_blocks.transpose(-1, -2)
            grad_logits = grad_logits.sub_(delta[:, :, chunk, ..., None]).mul_(probs)
            del probs
            torch.matmul(grad_logits, k_blocks, out=grad_q_tiles[:, :, chunk])
            grad_k_blocks = grad_logits.transpose(-1, -2) @ q_tiles[:, :, chunk]
            _add_key_blocks(grad_k_maps, grad_k_blocks, rows, cols, chunk)
            if grad_bias is not None:
                _add_class_bias_grad(grad_bias, grad_logits, rows, cols, chunk)
        grad_q = _untile(grad_q_tiles.mul_(scale), rows, cols)
        grad_k, grad_v = _heads_last(grad_k_maps), _heads_last(grad_v_maps)
        return grad_q, grad_k, grad_v, grad_bias, None, None, None


def _replay_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    rows: AxisTiling,
    cols: AxisTiling,
    scale: float,
    grad_out: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients with a graph: autograd through a replay of `_tiled_forward` (plain torch ops)."""
    # Views, so that q, k and v stay separate inputs even when they are one tensor (na2d(x, x, x)).
    q, k, v, bias = inputs = tuple(x.view_as(x) for x in (q, k, v, bias))
    wanted = [x for x, needed in zip(inputs, needs_input_grad, strict=False) if needed]
    out = _untile(_tiled_forward(q, k, v, bias, rows, cols, scale), rows, cols)
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
    result = [next(grads) if needed else None for needed in needs_input_grad[:4]]
    return (*result, None, None, None)


def _tiled_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    rows: AxisTiling,
    cols: AxisTiling,
    scale: float,
) -> torch.Tensor:
    """Forward of `TiledAttention`: output tiles [N, heads, nth, ntw, Tr * Tc, D]."""
    q_tiles = _query_tiles(q * scale, rows, cols)
    k_maps, v_maps = _heads_first(k), _heads_first(v)
    out_tiles = torch.empty_like(q_tiles)
    for chunk in _chunks(q_tiles, rows, cols):
        k_blocks = _key_blocks(k_maps, rows, cols, chunk)
        v_blocks = _key_blocks(v_maps, rows, cols, chunk)
        logits = _logits(q_tiles[:, :, chunk], k_blocks, bias, rows, cols, chunk)
        out_tiles[:, :, chunk] = logits.softmax(dim=-1) @ v_blocks
    return out_tiles


# Logit elements per chunk (fp32: 512 KiB): big enough for efficient matmuls, small enough
# to stay near cache and keep peak memory near the inputs.
CHUNK_ELEMENTS = 1 << 17


def _chunks(q_tiles: torch.Tensor, rows: AxisTiling, cols: AxisTiling) -> list[slice]:
    """Slices of tile rows whose logits hold about CHUNK_ELEMENTS values."""
    batch, heads = q_tiles.shape[:2]
    per_tile_row = batch * heads * cols.num_tiles * rows.tile * cols.tile * rows.block * cols.block
    step = max(1, CHUNK_ELEMENTS // per_tile_row)
    return [slice(start, start + step) for start in range(0, rows.num_tiles, step)]


def _logits(
    q_tiles: torch.Tensor,
    k_blocks: torch.Tensor,
    bias: torch.Tensor,
    rows: AxisTiling,
    cols: AxisTiling,
    chunk: slice,
) -> torch.Tensor:
    """[N, heads, nr, ntw, Tr*Tc, Bkr*Bkc] = scaled q . k + per-tile bias (RPB and -inf mask)."""
    tile_bias = bias.index_select(1, rows.tile_class[chunk]).index_select(2, cols.tile_class)
    return torch.matmul(q_tiles, k_blocks.transpose(-1, -2)).add_(tile_bias)


def _add_class_bias_grad(
    grad_bias: torch.Tensor,
    grad_logits: torch.Tensor,
    rows: AxisTiling,
    cols: AxisTiling,
    chunk: slice,
) -> None:
    """Accumulate d logits of a chunk into the class table's gradient [heads', ncr, ncc, ., .]."""
    per_tile = grad_logits.sum(0)
    if grad_bias.shape[0] == 1:
        per_tile = per_tile.sum(0, keepdim=True)
    num_row_tiles = per_tile.shape[1]
    by_col_class = per_tile.new_zeros(grad_bias.shape[0], num_row_tiles, *grad_bias.shape[2:])
    by_col_class.index_add_(2, cols.tile_class, per_tile)
    grad_bias.index_add_(1, rows.tile_class[chunk], by_col_class)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[N, H, W, heads, D] -> contiguous [N, heads, H, W, D]."""
    return x.permute(0, 3, 1, 2, 4).contiguous()


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    """[N, heads, H, W, D] -> [N, H, W, heads, D] (a view)."""
    return x.permute(0, 2, 3, 1, 4)


def _query_tiles(q: torch.Tensor, rows: AxisTiling, cols: AxisTiling) -> torch.Tensor:
    """[N, H, W, heads, D] -> [N, heads, nth, ntw, Tr * Tc, D] (zero-padded to whole tiles)."""
    batch, height, width, heads, head_dim = q.shape
    pad_h = rows.num_tiles * rows.tile - height
    pad_w = cols.num_tiles * cols.tile - width
    if pad_h or pad_w:
        q = F.pad(q, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    q = q.reshape(batch, rows.num_tiles, rows.tile, cols.num_tiles, cols.tile, heads, head_dim)
    q = q.permute(0, 5, 1, 3, 2, 4, 6)
    return q.reshape(batch, heads, rows.num_tiles, cols.num_tiles, -1, head_dim)


def _untile(x: torch.Tensor, rows: AxisTiling, cols: AxisTiling) -> torch.Tensor:
    """Inverse of `_query_tiles`: [N, heads, nth, ntw, Tr * Tc, D] -> [N, H, W, heads, D]."""
    batch, heads, _, _, _, head_dim = x.shape
    x = x.view(batch, heads, rows.num_tiles, cols.num_tiles, rows.tile, cols.tile, head_dim)
    x = x.permute(0, 2, 4, 3, 5, 1, 6).reshape(
        batch, rows.num_tiles * rows.tile, cols.num_tiles * cols.tile, heads, head_dim
    )
    return x[:, : rows.length, : cols.length]


def _key_blocks(maps: torch.Tensor, rows: AxisTiling, cols: AxisTiling, chunk: slice):
    """[N, heads, H, W, D] -> [N, heads, nr, ntw, Bkr * Bkc, D], the blocks of a chunk's tiles."""
    batch, heads, _, _, head_dim = maps.shape
    row_index = rows.key_index[chunk]
    # Two index_selects and a transpose: measured faster than one advanced-index gather.
    blocks = maps.index_select(2, row_index.flatten()).index_select(3, cols.key_index.flatten())
    blocks = blocks.view(
        batch, heads, row_index.shape[0], rows.block, cols.num_tiles, cols.block, head_dim
    ).transpose(3, 4)
    return blocks.reshape(batch, heads, row_index.shape[0], cols.num_tiles, -1, head_dim)


def _add_key_blocks(
    maps: torch.Tensor, blocks: torch.Tensor, rows: AxisTiling, cols: AxisTiling, chunk: slice
) -> None:
    """Inverse of `_key_blocks` for gradients: add the blocks of a chunk into `maps` in place."""
    batch, heads, _, width, head_dim = maps.shape
    row_index = rows.key_index[chunk]
    blocks = blocks.view(
        batch, heads, row_index.shape[0], cols.num_tiles, rows.block, cols.block, head_dim
    ).transpose(3, 4)
    blocks = blocks.reshape(batch, heads, -1, cols.num_tiles * cols.block, head_dim)
    block_rows = maps.new_zeros(batch, heads, blocks.shape[2], width, head_dim)
    block_rows.index_add_(3, cols.key_index.flatten(), blocks)
    maps.index_add_(2, row_index.flatten(), block_rows)
