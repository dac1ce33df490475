"""The compiled CPU backend in bfloat16 and float16: exact to the storage dtype's rounding.

Inputs are rounded to the dtype, the kernel computes in float32 and rounds each output and
gradient once; the oracle computes in float64 from the same rounded inputs (and the same rounded
output gradient), so the tolerances below are a few roundings of the dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nat_mm import ops
from nat_mm.ops import na2d
from nat_mm.ops.reference import na2d_reference, random_inputs

pytestmark = pytest.mark.requires_cpu_kernel

HALF = [torch.bfloat16, torch.float16]
# (atol, rtol) for values of order one: bfloat16 keeps 8 significant bits, float16 11.
TOLERANCES = {torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}

# (shape [B, H, W, heads, head_dim], kernel_size, dilation): the 7x7 / head_dim 32 fast path with
# and without dilation, odd and non-square maps, per-axis settings, uneven sub-lattices (W % d),
# head dims the kernel pads (8) and wider ones (64), H == W == K.
CASES = [
    ((2, 15, 17, 2, 32), 7, 2),
    ((1, 14, 23, 3, 32), 7, (2, 3)),
    ((2, 9, 11, 2, 8), 3, 1),
    ((1, 21, 22, 2, 64), 5, 3),
    ((1, 12, 19, 1, 32), (3, 5), (4, 2)),
    ((1, 7, 7, 2, 16), 7, 1),
]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def _check_against_oracle(
    shape, kernel_size, dilation, dtype, with_rpb=True, rpb_dtype=torch.float32
) -> None:
    q, k, v, rpb = random_inputs(shape, _pair(kernel_size), with_rpb, dtype)
    rpb = rpb.to(rpb_dtype) if rpb is not None else None
    inputs = [x.requires_grad_() for x in (q, k, v, rpb) if x is not None]
    reference_inputs = [x.detach().double().requires_grad_() for x in inputs]
    out = na2d(*inputs[:3], kernel_size, dilation, rpb=rpb, backend='cpu')
    ref = na2d_reference(*reference_inputs[:3], kernel_size, dilation, *reference_inputs[3:])
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out.double())
    for name, x, grad, ref_grad in zip('qkvr', inputs, grads, ref_grads, strict=False):
        assert grad.dtype == x.dtype, name  # the rpb's gradient comes back in the rpb's dtype
        scale = max(1.0, ref_grad.abs().max().item())  # rpb gradients sum over every query
        torch.testing.assert_close(
            grad.double(), ref_grad, atol=2 * atol * scale, rtol=2 * rtol, msg=name
        )


@pytest.mark.parametrize('dtype', HALF, ids=str)
@pytest.mark.parametrize(('shape', 'kernel_size', 'dilation'), CASES, ids=str)
def test_matches_oracle(shape, kernel_size, dilation, dtype) -> None:
    _check_against_oracle(shape, kernel_size, dilation, dtype)


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_without_rpb(dtype) -> None:
    _check_against_oracle((2, 15, 17, 2, 32), 7, 2, dtype, with_rpb=False)
    _check_against_oracle((1, 11, 13, 3, 8), 5, (1, 2), dtype, with_rpb=False)


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_rpb_in_the_input_dtype(dtype) -> None:
    _check_against_oracle((1, 14, 15, 2, 32), 7, 2, dtype, rpb_dtype=dtype)


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_chosen_automatically(dtype) -> None:
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 8), (3, 3), True, dtype)
    out = na2d(q, k, v, 3, rpb=rpb)
    assert ops.last_backend() == 'cpu' and out.dtype == dtype


@pytest.mark.parametrize('dtype', HALF, ids=str)
@pytest.mark.parametrize(
    ('shape', 'dilation'),
    [((1, 30, 23, 1, 32), 1), ((1, 40, 31, 2, 32), 3), ((2, 20, 9, 1, 8), (2, 1))],
    ids=['one-sub-lattice', 'dilated', 'padded-head-dim'],
)
def test_threads_give_the_one_thread_result(set_threads, shape, dilation, dtype) -> None:
    """Fewer row sub-lattices than threads: the backward splits them into chunks too."""
    q, k, v, rpb = (x.requires_grad_() for x in random_inputs(shape, (7, 3), True, dtype))
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run() -> list[torch.Tensor]:
        out = na2d(q, k, v, (7, 3), dilation, rpb=rpb, backend='cpu')
        return [out, *torch.autograd.grad(out, (q, k, v, rpb), grad_out)]

    set_threads(1)
    one = run()
    for threads in (3, 4, 3):
        set_threads(threads)
        for single, result in zip(one, run(), strict=True):
            assert torch.equal(result, single)


def test_under_autocast_qkv_views_take_the_kernel() -> None:
    """Under autocast the qkv projection outputs bfloat16, na2d gets bfloat16 views of it and the
    float32 rpb parameter; the rpb's gradient comes back in float32."""
    torch.manual_seed(0)
    batch, height, width, heads, head_dim = 1, 16, 18, 2, 32
    channels = heads * head_dim
    qkv = nn.Linear(channels, 3 * channels)
    rpb = nn.Parameter(torch.randn(heads, 13, 13) * 0.1)
    x = torch.randn(batch, height, width, channels)

    def attention(autocast: bool) -> torch.Tensor:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            parts = qkv(x).reshape(batch, height, width, 3, heads, head_dim).unbind(3)
            return na2d(*parts, 7, 2, rpb=rpb)

    out = attention(True)
    assert ops.last_backend() == 'cpu' and out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = [p.grad.clone() for p in (rpb, qkv.weight)]
    assert rpb.grad.dtype == torch.float32 and all(g.isfinite().all() for g in grads)
    rpb.grad = qkv.weight.grad = None
    reference = attention(False)
    reference.square().sum().backward()
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    for grad, reference_grad in zip(grads, (rpb.grad, qkv.weight.grad), strict=True):
        scale = reference_grad.abs().max()
        torch.testing.assert_close(grad / scale, reference_grad / scale, atol=3e-2, rtol=0)
