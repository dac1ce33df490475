"""Reference 2-D (dilated) neighborhood attention: an explicit gather, straight from the docs.

Follows docs/neighborhood-attention.md sections 1-2 (NATTEN 0.14 semantics) with no tiling or
other cleverness, so that it is obviously correct: the oracle every backend is tested against.
It gathers the K*K window of every query (K*K times the memory of k and v): use it on small
inputs, or on chunks of query rows (`query_rows`; the `torch` backend does so for non-finite
inputs). Works in any float dtype (float64 for gradient checks) and gives gradients, of any order,
through plain autograd.
"""

from __future__ import annotations

import torch


def window_indices(
    length: int, kernel_size: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key indices and RPB indices of every query on one axis.

    Args:
        length: Axis length L (must be >= kernel_size * dilation).
        kernel_size: Odd window size K.
        dilation: Dilation d.

    Returns:
        keys: [L, K] long, the key index of window slot k for each query.
        rpb_index: [L, K] long, `(key - query) // d + K - 1`, in [0, 2K-2].
    """
    keys = torch.empty(length, kernel_size, dtype=torch.long)
    rpb_index = torch.empty(length, kernel_size, dtype=torch.long)
    for i in range(length):
        r = i % dilation
        p = i // dilation
        group_length = len(range(r, length, dilation))
        start = min(max(p - kernel_size // 2, 0), group_length - kernel_size)
        for k in range(kernel_size):
            key = (start + k) * dilation + r
            keys[i, k] = key
            rpb_index[i, k] = (key - i) // dilation + kernel_size - 1
    return keys, rpb_index


def na2d_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    query_rows: slice | None = None,
) -> torch.Tensor:
    """Reference neighborhood attention.

    Args:
        q, k, v: [B, H, W, heads, head_dim].
        kernel_size: K or (Kh, Kw), odd.
        dilation: d or (dh, dw).
        rpb: [heads, 2Kh-1, 2Kw-1] or None.
        scale: Logit scale; default head_dim ** -0.5.
        query_rows: Only these query rows (a slice with step 1); their windows still come from
            the whole map. Lets a caller bound the gather's memory by running rows in chunks.

    Returns:
        [B, H, W, heads, head_dim] (H = the rows of `query_rows` if given), same dtype as q.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    _, height, width, _, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    rows, rows_rpb = window_indices(height, kh, dh)
    cols, cols_rpb = window_indices(width, kw, dw)
    if query_rows is not None:
        q, rows, rows_rpb = q[:, query_rows], rows[query_rows], rows_rpb[query_rows]
    rows, rows_rpb = rows.to(q.device), rows_rpb.to(q.device)
    cols, cols_rpb = cols.to(q.device), cols_rpb.to(q.device)
    # [B, H, W, Kh, Kw, heads, head_dim]: the window of every query.
    row_index = rows[:, None, :, None]
    col_index = cols[None, :, None, :]
    k_win = k[:, row_index, col_index]
    v_win = v[:, row_index, col_index]
    logits = torch.einsum('bxyhd,bxyijhd->bxyhij', q * scale, k_win)  # [B, H, W, heads, Kh, Kw]
    if rpb is not None:
        # bias[h, x, y, i, j] = rpb[h, rows_rpb[x, i], cols_rpb[y, j]]
        bias = rpb[:, rows_rpb[:, None, :, None], cols_rpb[None, :, None, :]]
        logits = logits + bias.permute(1, 2, 0, 3, 4)
    weights = logits.flatten(-2).softmax(dim=-1).view_as(logits)
    return torch.einsum('bxyhij,bxyijhd->bxyhd', weights, v_win)


def random_inputs(
    shape: tuple[int, int, int, int, int],
    kernel_size: tuple[int, int],
    with_rpb: bool,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random q, k, v [B, H, W, heads, D] and rpb [heads, 2Kh-1, 2Kw-1] (or None) for tests."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    rpb = None
    if with_rpb:
        rpb_shape = (shape[3], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        rpb = torch.randn(rpb_shape, generator=generator).to(dtype)
    return q, k, v, rpb
