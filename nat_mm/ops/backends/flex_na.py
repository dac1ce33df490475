"""FlexAttention backend: `torch.nn.attention.flex_attention` with a neighborhood BlockMask.

Dilation runs as undilated attention on every sub-lattice (`lattice.py`). Tokens are reordered
tile by tile (TILE_ROWS x TILE_COLS = 128 tokens = one Flex block) so that a query block needs
only its neighbouring key blocks; padding tokens to whole tiles are masked out as keys and dropped
as queries. The RPB is a `score_mod` reading the table captured as a tensor.

Sizes change every iteration in detection, so:
- `flex_attention` is compiled once with `dynamic=True`, and the map geometry reaches `mask_mod`
  and `score_mod` as tensors, not Python ints: a new size does not recompile (tests/test_ops_cuda.py
  counts). Dynamo still specializes a size of 1 and, until it sees them differ, sizes that are
  equal (e.g. 2 tiles and batch 2): such a size costs one more compile, once.
- BlockMasks are cached per (H, W, Kh, Kw, device) (LRU, MASK_CACHE_SIZE entries): a size that
  recurs (fixed-size test or inference, the few scales of a multi-scale schedule) reuses its mask;
  a new size pays one `create_block_mask` (compiled on CUDA).
FlexAttention has no backward on CPU: there it is forward-only and never chosen automatically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .lattice import map_sub_lattices
from .windows import bias_index, window_start

NAME = 'flex'
TILE_ROWS, TILE_COLS = 8, 16  # 128 tokens: Flex's default block size
MASK_CACHE_SIZE = 32
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CUDA_HEAD_DIM = 16  # triton's tl.dot (torch/_inductor/kernel/flex/flex_attention.py)


@functools.cache
def _flex_api() -> tuple[Callable, Callable] | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@functools.cache
def _compiled_flex() -> Callable:
    flex_attention, _ = _flex_api()
    return torch.compile(flex_attention, dynamic=True)


def unavailable_reason() -> str | None:
    """Why FlexAttention cannot be used at all here, or None."""
    if _flex_api() is None:
        return f'torch {torch.__version__} has no torch.nn.attention.flex_attention'
    return None


def can_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> str | None:
    """Why the Flex backend cannot compute these inputs, or None."""
    if q.dtype not in DTYPES:
        return f'FlexAttention supports dtypes {DTYPES}, got {q.dtype}'
    if q.device.type == 'cpu':
        tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
        if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
            return 'FlexAttention has no backward on CPU; inputs require grad'
    elif q.device.type != 'cuda':
        return f'FlexAttention runs on cuda or cpu, got device {q.device}'
    elif q.shape[-1] < MIN_CUDA_HEAD_DIM:
        return (
            f"FlexAttention's CUDA kernels need head_dim >= {MIN_CUDA_HEAD_DIM}, "
            f'got head_dim={q.shape[-1]}'
        )
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
    """Neighborhood attention through FlexAttention on [B, H, W, heads, head_dim]."""

    def attend(q_sub: torch.Tensor, k_sub: torch.Tensor, v_sub: torch.Tensor) -> torch.Tensor:
        return _flex_na(q_sub, k_sub, v_sub, kernel_size, rpb, scale)

    return map_sub_lattices(q, k, v, dilation, attend)


def _geometry(height: int, width: int, kernel_size: tuple[int, int], device: torch.device):
    """Map size and kernel as a tensor (so compiled code treats them as data, not constants)."""
    tiles_w = -(-width // TILE_COLS)
    values = (height, width, kernel_size[0], kernel_size[1], tiles_w)
    return torch.tensor(values, dtype=torch.int64, device=device)


def _token_position(index: torch.Tensor, geometry: torch.Tensor):
    """Tile-ordered token index -> (row, col) on the map."""
    tile, within = index // (TILE_ROWS * TILE_COLS), index % (TILE_ROWS * TILE_COLS)
    tiles_w = geometry[4]
    row = (tile // tiles_w) * TILE_ROWS + within // TILE_COLS
    col = (tile % tiles_w) * TILE_COLS + within % TILE_COLS
    return row, col


def _make_mask_mod(geometry: torch.Tensor) -> Callable:
    def mask_mod(batch, head, q_index, kv_index):
        height, width, kernel_h, kernel_w = geometry[0], geometry[1], geometry[2], geometry[3]
        q_row, q_col = _token_position(q_index, geometry)
        k_row, k_col = _token_position(kv_index, geometry)
        # Undilated (a sub-lattice): the axis is the group (docs/neighborhood-attention.md 1).
        start_row = window_start(q_row, height, kernel_h)
        start_col = window_start(q_col, width, kernel_w)
        inside_rows = (k_row >= start_row) & (k_row < start_row + kernel_h)
        inside_cols = (k_col >= start_col) & (k_col < start_col + kernel_w)
        return inside_rows & inside_cols

    return mask_mod


def _make_score_mod(geometry: torch.Tensor, rpb: torch.Tensor) -> Callable:
    def score_mod(score, batch, head, q_index, kv_index):
        kernel_h, kernel_w = geometry[2], geometry[3]
        q_row, q_col = _token_position(q_index, geometry)
        k_row, k_col = _token_position(kv_index, geometry)
        # Clamped: pairs outside the window are masked anyway but must index in bounds.
        index_h = torch.clamp(bias_index(k_row, q_row, kernel_h), 0, 2 * kernel_h - 2)
        index_w = torch.clamp(bias_index(k_col, q_col, kernel_w), 0, 2 * kernel_w - 2)
        return score + rpb[head, index_h, index_w]

    return score_mod


@functools.lru_cache(maxsize=MASK_CACHE_SIZE)
def _block_mask(height: int, width: int, kernel_size: tuple[int, int], device: torch.device):
    _, create_block_mask = _flex_api()
    tokens = -(-height // TILE_ROWS) * TILE_ROWS * -(-width // TILE_COLS) * TILE_COLS
    mask_mod = _make_mask_mod(_geometry(height, width, kernel_size, device))
    return create_block_mask(
        mask_mod, None, None, tokens, tokens, device=device, _compile=device.type == 'cuda'
    )


def _to_tiles(x: torch.Tensor) -> torch.Tensor:
    """[N, H, W, heads, D] -> [N, heads, tokens, D] in tile order (zero-padded to whole tiles)."""
    batch, height, width, heads, head_dim = x.shape
    pad_h, pad_w = -height % TILE_ROWS, -width % TILE_COLS
    x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    tiles_h, tiles_w = (height + pad_h) // TILE_ROWS, (width + pad_w) // TILE_COLS
    x = x.view(batch, tiles_h, TILE_ROWS, tiles_w, TILE_COLS, heads, head_dim)
    # Always contiguous: with one tile column the reshape would be a view with other strides, and
    # compiled Flex guards on strides (one recompile when the map grows a second tile column).
    return x.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, heads, -1, head_dim).contiguous()


def _from_tiles(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `_to_tiles`: [N, heads, tokens, D] -> [N, H, W, heads, D]."""
    batch, heads, _, head_dim = x.shape
    tiles_h, tiles_w = -(-height // TILE_ROWS), -(-width // TILE_COLS)
    x = x.view(batch, heads, tiles_h, tiles_w, TILE_ROWS, TILE_COLS, head_dim)
    x = x.permute(0, 2, 4, 3, 5, 1, 6).reshape(
        batch, tiles_h * TILE_ROWS, tiles_w * TILE_COLS, heads, head_dim
    )
    return x[:, :height, :width]


def _flex_na(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Undilated neighborhood attention on [N, H, W, heads, D] via compiled FlexAttention."""
    _, height, width, heads, _ = q.shape
    block_mask = _block_mask(height, width, kernel_size, q.device)
    if rpb is None and q.device.type == 'cpu':
        # torch 2.13's inductor CPU template fails to compile Flex without a score_mod
        # (`cur_qSplitSize8` undeclared): add a zero bias instead.
        rpb = q.new_zeros(heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
    score_mod = None
    if rpb is not None:
        geometry = _geometry(height, width, kernel_size, q.device)
        score_mod = _make_score_mod(geometry, rpb.to(q.dtype))
    out = _compiled_flex()(
        _to_tiles(q),
        _to_tiles(k),
        _to_tiles(v),
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
    )
    return _from_tiles(out, height, width)
