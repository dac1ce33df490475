"""Gradients of na2d by replaying a forward under autograd (shared by the traced node and the
`cpu` backend's double backward)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _separate(t: torch.Tensor | None, create_graph: bool) -> torch.Tensor | None:
    """A tensor of its own for a saved input (q, k and v may be one tensor: na2d(x, x, x)).

    With create_graph a view, which keeps the graph back to the input (double backward), else a
    detached copy.
    """
    if t is None:
        return None
    return t.view_as(t) if create_graph else t.detach().requires_grad_(t.requires_grad)


def replay_gradients(
    forward: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor | None],
    needs_input_grad: Sequence[bool],
    grad_out: torch.Tensor,
    create_graph: bool,
) -> list[torch.Tensor | None]:
    """Gradients of ``forward(*inputs)`` towards each input that needs one (None for the others).

    Each input is separated first, so that one tensor passed as several inputs gets each
    input's own share of the gradient, not the whole of it once per input.
    """
    inputs = [_separate(t, create_graph) for t in inputs]
    needed = [t is not None and need for t, need in zip(inputs, needs_input_grad, strict=False)]
    with torch.enable_grad():
        out = forward(*inputs)
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need]
    grads = iter(
        torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph) if wanted else ()
    )
    return [next(grads) if need else None for need in needed]
