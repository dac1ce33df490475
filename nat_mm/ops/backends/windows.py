"""The window rule of neighborhood attention, written once for every backend.

docs/neighborhood-attention.md sections 1-2: on an axis of length L with kernel K and dilation d,
query i lies on sub-lattice `i % d` at index `p = i // d`; that sub-lattice has
`L_r = ceil((L - i % d) / d)` positions; the window starts at `s = clamp(p - K // 2, 0, L_r - K)`
(windows shift inward at borders) and holds the keys `(s + k) * d + i % d`, whose RPB indices are
`s + k - p + K - 1`. Written in torch operations that take tensors or ints alike, so that the same
lines build the `cpu` kernel's tables, the `torch` backend's tiles, the `flex` backend's mask and
score mods (tensors inside a vmap) and the portable gather form (`nat_mm/ops/gather.py`, symbolic
sizes under export). The oracles (`nat_mm.ops.reference`, `nat_mm.testing.nat_reference`) keep
their own copies on purpose.
"""

from __future__ import annotations

import torch


def window_start(
    index: torch.Tensor, group_length: torch.Tensor | int, kernel_size: torch.Tensor | int
) -> torch.Tensor:
    """First window position of the queries at `index` of a sub-lattice of `group_length`.

    `clamp(index - K // 2, 0, group_length - K)`, in sub-lattice coordinates (undilated: the axis).
    """
    start = index - kernel_size // 2
    last = group_length - kernel_size
    return torch.where(start > last, last, start).clamp(min=0)


def bias_index(
    key: torch.Tensor, query: torch.Tensor, kernel_size: torch.Tensor | int
) -> torch.Tensor:
    """RPB table index of `key` for `query` (sub-lattice coordinates): `key - query + K - 1`.

    In `[0, 2K - 2]` for a key of the query's window; callers that also pair keys outside the
    window (masked ones) clamp it to stay in bounds.
    """
    return key - query + kernel_size - 1


def axis_window(
    length: int, kernel_size: int, dilation: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First key of every query's window on one axis, and that key's RPB index.

    Args:
        length: Axis length L (an int, or a symbolic size under export).
        kernel_size: Odd K.
        dilation: d >= 1.
        device: Where the tables live.

    Returns:
        first_key, first_bias: [L] long each. Window slot k of query i is key
        `first_key[i] + k * d` with RPB index `first_bias[i] + k`.
    """
    position = torch.arange(length, device=device)
    residue, index = position % dilation, position // dilation
    group_length = (length - residue + dilation - 1) // dilation
    start = window_start(index, group_length, kernel_size)
    return start * dilation + residue, bias_index(start, index, kernel_size)
