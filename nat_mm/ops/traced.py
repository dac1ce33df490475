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
from .backends.replay import replay_gradients


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

        def replay(q, k, v, rpb):
            return BACKENDS[backend].forward(q, k, v, kernel_size, dilation, rpb, scale)

        grads = replay_gradients(
            replay, ctx.saved_tensors, ctx.needs_input_grad[:4], grad_out, torch.is_grad_enabled()
        )
        return (*grads, None, None, None, None)
