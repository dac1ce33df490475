"""Dilated neighborhood attention as plain attention on sub-lattices (shared by the backends).

Dilation d on an axis of length L splits it into d independent sub-lattices `x[r::d]`
(docs/neighborhood-attention.md section 1). Groups `r < rem` have `ceil(L / d)` elements, the
others one fewer, where `rem = L - (ceil(L / d) - 1) * d`. So a 2-D map splits into at most four
*classes* of equally-sized sub-lattices, each class batched into one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AxisGroups:
    """Residue groups of one axis with the same sub-lattice length.

    Attributes:
        length: Length of each sub-lattice in this class.
        first: First residue (group index) of the class.
        stop: One past the last residue of the class.
    """

    length: int
    first: int
    stop: int


def axis_group_classes(length: int, dilation: int) -> list[AxisGroups]:
    """Split the residues 0..d-1 of an axis into classes of equal sub-lattice length."""
    longest = -(-length // dilation)
    rem = length - (longest - 1) * dilation  # groups 0..rem-1 have `longest` elements
    classes = [AxisGroups(longest, 0, rem)]
    if rem < dilation:
        classes.append(AxisGroups(longest - 1, rem, dilation))
    return classes


LatticeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def map_sub_lattices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: tuple[int, int],
    attend: LatticeFn,
) -> torch.Tensor:
    """Run undilated attention `attend` on every sub-lattice of q, k, v and reassemble.

    Args:
        q, k, v: [B, H, W, heads, head_dim].
        dilation: (dh, dw).
        attend: Called as `attend(q_sub, k_sub, v_sub)` on [N, Lh, Lw, heads, head_dim] views
            (N = B * groups); returns the same shape.

    Returns:
        [B, H, W, heads, head_dim].
    """
    dil_h, dil_w = dilation
    if dil_h == 1 and dil_w == 1:
        return attend(q, k, v)
    batch, height, width, heads, head_dim = q.shape
    rows = axis_group_classes(height, dil_h)
    cols = axis_group_classes(width, dil_w)
    pad_h = rows[0].length * dil_h - height
    pad_w = cols[0].length * dil_w - width

    def split(x: torch.Tensor) -> torch.Tensor:
        # [B, Hq, dh, Wq, dw, heads, D]: element (y, gy, x, gx) is pixel (y * dh + gy, x * dw + gx).
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
        return x.reshape(batch, rows[0].length, dil_h, cols[0].length, dil_w, heads, head_dim)

    q_split, k_split, v_split = split(q), split(k), split(v)
    out = q.new_empty(batch, rows[0].length, dil_h, cols[0].length, dil_w, heads, head_dim)
    for row in rows:
        for col in cols:
            index = (
                slice(None),
                slice(0, row.length),
                slice(row.first, row.stop),
                slice(0, col.length),
                slice(col.first, col.stop),
            )
            shape = (batch, row.stop - row.first, col.stop - col.first, row.length, col.length)
            result = attend(
                _gather_class(q_split, index, shape),
                _gather_class(k_split, index, shape),
                _gather_class(v_split, index, shape),
            )
            out[index] = result.view(*shape, heads, head_dim).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.view(batch, rows[0].length * dil_h, cols[0].length * dil_w, heads, head_dim)
    return out[:, :height, :width]


def _gather_class(
    x: torch.Tensor, index: tuple[slice, ...], shape: tuple[int, ...]
) -> torch.Tensor:
    """[B, Hq, dh, Wq, dw, heads, D] -> [B * gh * gw, Lh, Lw, heads, D] for one class."""
    batch, groups_h, groups_w, length_h, length_w = shape
    x = x[index].permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(batch * groups_h * groups_w, length_h, length_w, *x.shape[-2:])
