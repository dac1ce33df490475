"""One-node autograd wrapper so that `torch.jit.trace` (FLOP counting) sees na2d as one op.

Traced, a `torch.autograd.Function` becomes `prim::PythonOp` with `pyname()` equal to the class
name: mmengine's `jit_analysis` names it `prim::PythonOp.TracedNeighborhoodAttention2D`, the key
of the handle in `nat_mm/ops/flops.py`. The Function is named apart from the nn.Module
`nat_mm.models.layers.NeighborhoodAttention2D` (whose name configs and checkpoints keep) so
that the two are not confused.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import BACKENDS


class TracedNeighborhoodAttention2D(torch.autograd.Function):
    """na2d as a single autograd node; the backward recomputes the forward under autograd.

    With `create_graph=True` the recomputation starts from the saved inputs themselves, so the
    gradients are differentiable again if the backend's are.
    """

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
        create_graph = torch.is_grad_enabled()
        inputs = [_separate(t, create_graph) for t in ctx.saved_tensors]
        needed = [
            t is not None and need for t, need in zip(inputs, ctx.needs_input_grad[:4], strict=True)
        ]
        with torch.enable_grad():
            out = BACKENDS[backend].forward(*inputs[:3], kernel_size, dilation, inputs[3], scale)
        wanted = [t for t, need in zip(inputs, needed, strict=True) if need]
        grads = iter(
            torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph) if wanted else ()
        )
        result = [next(grads) if need else None for need in needed]
        return (*result, None, None, None, None)


def _separate(t: torch.Tensor | None, create_graph: bool) -> torch.Tensor | None:
    """A tensor of its own for a saved input (q, k and v may be one tensor: na2d(x, x, x)).

    With create_graph a view, which keeps the graph back to the input (double backward), else a
    detached copy.
    """
    if t is None:
        return None
    return t.view_as(t) if create_graph else t.detach().requires_grad_(t.requires_grad)
