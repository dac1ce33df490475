"""na2d in plain gathers and matmuls: the portable form of `torch.ops.nat_mm.na2d`.

Used where no nat_mm kernel can run: it is the decomposition that lowers the operator to ONNX's
standard operators (Gather, MatMul, Softmax, ...) and to a self-contained ExportedProgram
(`nat_mm/ops/export.py`). Every query's Kh x Kw window of keys and values is gathered by two
`index_select`s per axis (ONNX Gather on one axis) with the shared window rule
(`backends/windows.py`), so its size is linear in `B * H * W * Kh * Kw * heads * head_dim`
and it is exact at borders, with dilation and with the RPB. Sizes may be symbolic (dynamic H, W
under export): the index tables are computed from them in the graph.
"""

from __future__ import annotations

import torch

from .backends.windows import axis_window


def window_keys(
    length: int, kernel_size: int, dilation: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and RPB indices of every query's window on one axis: [L, K] long each."""
    first_key, first_bias = axis_window(length, kernel_size, dilation, device)
    slots = torch.arange(kernel_size, device=device)
    return first_key[:, None] + slots * dilation, first_bias[:, None] + slots


def na2d_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: list[int],
    dilation: list[int],
    scale: float,
) -> torch.Tensor:
    """Neighborhood attention on validated [B, H, W, heads, head_dim] inputs, by gathers.

    Args:
        q, k, v: [B, H, W, heads, head_dim].
        rpb: [heads, 2Kh-1, 2Kw-1] or None.
        kernel_size, dilation: (Kh, Kw), (dh, dw).
        scale: Logit scale applied to q.

    Returns:
        [B, H, W, heads, head_dim], contiguous.
    """
    batch, height, width, heads, head_dim = q.shape
    (kernel_h, kernel_w), (dilation_h, dilation_w) = kernel_size, dilation
    rows, row_bias = window_keys(height, kernel_h, dilation_h, q.device)
    cols, col_bias = window_keys(width, kernel_w, dilation_w, q.device)
    window = kernel_h * kernel_w

    def windows(x: torch.Tensor) -> torch.Tensor:
        # [B, H * Kh, W * Kw, heads, D]: (y * Kh + i, x * Kw + j) holds x[rows[y, i], cols[x, j]].
        x = x.index_select(1, rows.flatten()).index_select(2, cols.flatten())
        x = x.view(batch, height, kernel_h, width, kernel_w, heads, head_dim)
        return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, height, width, heads, window, head_dim)

    # [B, H, W, heads, 1, Kh * Kw], slots row-major (docs/neighborhood-attention.md section 2).
    logits = (q * scale).unsqueeze(-2) @ windows(k).transpose(-1, -2)
    if rpb is not None:
        bias = rpb.index_select(1, row_bias.flatten()).index_select(2, col_bias.flatten())
        bias = bias.view(heads, height, kernel_h, width, kernel_w).permute(1, 3, 0, 2, 4)
        logits = logits + bias.reshape(height, width, heads, 1, window).to(logits.dtype)
    return (logits.softmax(dim=-1) @ windows(v)).squeeze(-2)
