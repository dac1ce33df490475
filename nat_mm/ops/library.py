"""`torch.ops.nat_mm.na2d`: neighborhood attention as one PyTorch operator.

What a graph sees when na2d is captured (torch.compile, torch.export, make_fx: see
`functional.capturing_graph`), instead of a backend's Python, ctypes or Flex internals:

- `nat_mm::na2d(q, k, v, rpb, kernel_size, dilation, scale, backend)`: its kernel is the eager
  dispatch (`functional.dispatch`), so the backend is chosen, with its fallback, when the graph
  runs, on the device it runs on (`backend=None`), or forced by name. Its fake implementation
  gives the output's shape, so compiled and exported graphs need no real data and no kernel.
- `nat_mm::na2d_backward(...)`: the gradients, registered as na2d's autograd formula. On the `cpu`
  backend the C backward; on the others autograd through a replay of the backend's forward.
  It is not differentiable itself: double backward works in eager mode only.
- The portable decomposition `nat_mm/ops/gather.py` replaces the operator where no nat_mm
  kernel can run (ONNX, a self-contained ExportedProgram: `nat_mm/ops/export.py`).
"""

import contextlib
from collections.abc import Iterator

import torch

from . import functional
from .backends import cpu_na
from .backends.replay import replay_gradients

NAMESPACE = 'nat_mm'


@torch.library.custom_op(f'{NAMESPACE}::na2d', mutates_args=())
def na2d_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: list[int],
    dilation: list[int],
    scale: float,
    backend: str | None,
) -> torch.Tensor:
    """na2d on inputs that `nat_mm.ops.na2d` validated: [B, H, W, heads, head_dim]."""
    with torch.no_grad():
        out = functional.dispatch(q, k, v, tuple(kernel_size), tuple(dilation), rpb, scale, backend)
    # Contiguous, as the fake implementation says: compiled code indexes the output by it.
    return out.contiguous()


@na2d_op.register_fake
def _na2d_fake(q, k, v, rpb, kernel_size, dilation, scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op(f'{NAMESPACE}::na2d_backward', mutates_args=())
def na2d_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: list[int],
    dilation: list[int],
    scale: float,
    backend: str | None,
    rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of na2d towards q, k, v and rpb (an empty tensor unless `rpb_grad`)."""
    kernel, dil = tuple(kernel_size), tuple(dilation)
    rpb_grad = rpb is not None and rpb_grad
    if q.numel() == 0:
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        grads.append(torch.zeros_like(rpb) if rpb_grad else None)
    elif _backward_backend(q, k, v, kernel, dil, rpb, backend) == cpu_na.NAME:
        grads = cpu_na.gradients(q, k, v, rpb, grad_out, kernel, dil, scale, rpb_grad)
    else:

        def replay(q, k, v, rpb):
            return functional.dispatch(q, k, v, kernel, dil, rpb, scale, backend)

        needs = (True, True, True, rpb_grad)
        with _autograd_in_kernel():
            leaves = _leaves((q, k, v, rpb), needs)
            grads = replay_gradients(replay, leaves, needs, grad_out, create_graph=False)
    grad_rpb = grads[3] if grads[3] is not None else q.new_empty(0)
    return tuple(grad.contiguous() for grad in (*grads[:3], grad_rpb))


@na2d_backward_op.register_fake
def _na2d_backward_fake(grad_out, q, k, v, rpb, kernel_size, dilation, scale, backend, rpb_grad):
    grad_rpb = rpb.new_empty(rpb.shape) if rpb is not None and rpb_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_rpb


def _leaves(
    tensors: tuple[torch.Tensor | None, ...], needs: tuple[bool, ...]
) -> list[torch.Tensor | None]:
    """New leaves of `tensors` requiring grad where `needs` says (kernels get plain tensors)."""
    return [
        None if x is None else x.detach().requires_grad_(need)
        for x, need in zip(tensors, needs, strict=True)
    ]


@contextlib.contextmanager
def _autograd_in_kernel() -> Iterator[None]:
    """Autograd inside an operator's kernel, for the replay of a backend's forward.

    PyTorch runs the kernels of a custom operator with autograd's dispatch keys excluded
    (`torch._C._AutoDispatchBelowAutograd`; under a dispatch mode also ADInplaceOrView, which
    tracks the views that in-place writes go through): no graph would be recorded. This lifts
    that exclusion (and only that) for the block.
    """
    keys = torch._C.DispatchKey
    autograd = torch._C.DispatchKeySet(keys.AutogradFunctionality)
    for key in (keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        autograd = autograd | torch._C.DispatchKeySet(key)
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - autograd
    with torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def _backward_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: tuple[int, int],
    dil: tuple[int, int],
    rpb: torch.Tensor | None,
    backend: str | None,
) -> str:
    """The backend the forward would run first: forced, or the best automatic candidate."""
    if backend is not None:
        return backend
    configuration = functional._configuration(q, k, v, rpb)
    names, _ = functional._automatic_candidates(q, k, v, kernel, dil, rpb, configuration)
    return names[0]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, kernel_size, dilation, scale, backend = inputs
    ctx.save_for_backward(q, k, v, rpb)
    ctx.options = (kernel_size, dilation, scale, backend)


def _backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    q, k, v, rpb = ctx.saved_tensors
    kernel_size, dilation, scale, backend = ctx.options
    rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    grads = torch.ops.nat_mm.na2d_backward(
        grad_out, q, k, v, rpb, kernel_size, dilation, scale, backend, rpb_grad
    )
    return grads[0], grads[1], grads[2], grads[3] if rpb_grad else None, None, None, None, None


na2d_op.register_autograd(_backward, setup_context=_setup_context)
