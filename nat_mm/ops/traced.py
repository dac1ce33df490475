"""One-node autograd wrapper so that `torch.jit.trace` (FLOP counting) sees na2d as one op.

Traced, a `torch.autograd.Function` becomes `prim::PythonOp` with `pyname()` equal to the class
name; mmengine's `jit_analysis` names it `prim::PythonOp.NeighborhoodAttention2D`, the key used by
`nat_mm/ops/flops.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import BACKENDS


class NeighborhoodAttention2D(torch.autograd.Function):
    """na2d as a single autograd node; the backward recomputes the forward under autograd."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor | None,
        kernel_size: tuple[int, int],
        dilation: tuple[int, int],
        scale: float,
        backend: str,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, v, rpb)
        ctx.options = (kernel_size, dilation, scale, backend)
        return BACKENDS[backend].forward(q, k, v, kernel_size, dilation, rpb, scale)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernel_size, dilation, scale, backend = ctx.options
        saved = ctx.saved_tensors
        inputs = [
            t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in saved
        ]
        with torch.enable_grad():
            out = BACKENDS[backend].forward(*inputs[:3], kernel_size, dilation, inputs[3], scale)
        needs = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, needs, grad_out, allow_unused=True) if needs else ())
        result = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*result, None, None, None, None)
