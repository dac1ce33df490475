"""The natten and flex backends of na2d against the gather oracle (forward only on CPU)."""

from __future__ import annotations

import pytest
import torch

from nat_mm.ops import na2d
from nat_mm.ops.backends import check_backend
from nat_mm.ops.reference import na2d_reference, random_inputs

# (H, W, kernel_size, dilation, with_rpb)
NATTEN_CASES = [(9, 11, 3, 1), (20, 17, 5, 3), (12, 19, (3, 5), (4, 2))]
# Each new sub-lattice size compiles Flex for CPU (40 s to 2 min on 2 busy cores): one undilated
# case by default, the others (several sizes each) under -m slow.
FLEX_CASES = [(9, 11, 3, 1, True)]
FLEX_SLOW_CASES = [
    (20, 17, 5, 3, True),
    (9, 11, 3, 1, False),
    (13, 30, 3, 4, True),
    (12, 19, (3, 5), (4, 2), True),
    (14, 14, 7, 2, False),
]


def _pair(value):
    return (value, value) if isinstance(value, int) else value


def _check_forward(backend, height, width, kernel_size, dilation, with_rpb, device='cpu'):
    q, k, v, rpb = random_inputs((2, height, width, 2, 16), _pair(kernel_size), with_rpb)
    ref = na2d_reference(
        q.double(),
        k.double(),
        v.double(),
        kernel_size,
        dilation,
        rpb.double() if with_rpb else None,
    )
    moved = [x.to(device) if x is not None else None for x in (q, k, v, rpb)]
    with torch.no_grad():
        out = na2d(*moved[:3], kernel_size, dilation, rpb=moved[3], backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=1e-4)


def _skip_unless_runs(backend: str, device: str = 'cpu', with_rpb: bool = False) -> None:
    q = torch.zeros(1, 9, 9, 2, 16, device=device)
    rpb = torch.zeros(2, 5, 5, device=device) if with_rpb else None
    with torch.no_grad():
        reason = check_backend(backend, q, q, q, (3, 3), (1, 1), rpb)
    if reason is not None:
        pytest.skip(f'{backend} cannot run here: {reason}')


@pytest.mark.natten
@pytest.mark.parametrize('case', NATTEN_CASES, ids=str)
def test_natten_forward_matches_oracle(case) -> None:
    pytest.importorskip('natten', reason='NATTEN is optional (pip install natten)')
    _skip_unless_runs('natten')
    _check_forward('natten', *case, with_rpb=False)


@pytest.mark.natten
def test_natten_refuses_rpb_and_cpu_backward() -> None:
    pytest.importorskip('natten', reason='NATTEN is optional (pip install natten)')
    q = torch.zeros(1, 9, 9, 2, 16)
    assert 'rpb' in check_backend('natten', q, q, q, (3, 3), (1, 1), torch.zeros(2, 5, 5))
    q.requires_grad_()
    assert 'forward-only' in check_backend('natten', q, q, q, (3, 3), (1, 1), None)


@pytest.mark.parametrize('case', FLEX_CASES, ids=str)
def test_flex_cpu_forward_matches_oracle(case) -> None:
    _skip_unless_runs('flex')
    _check_forward('flex', *case)


@pytest.mark.slow
@pytest.mark.parametrize('case', FLEX_SLOW_CASES, ids=str)
def test_flex_cpu_forward_matches_oracle_more(case) -> None:
    _skip_unless_runs('flex')
    _check_forward('flex', *case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('backend', ['flex', 'torch'])
def test_cuda_forward_backward_matches_oracle(backend: str) -> None:
    _skip_unless_runs(backend, 'cuda', with_rpb=True)
    kernel_size, dilation = 5, 3
    q, k, v, rpb = random_inputs((2, 20, 17, 2, 16), (5, 5), True)
    inputs = [x.cuda().requires_grad_() for x in (q, k, v, rpb)]
    out = na2d(*inputs[:3], kernel_size, dilation, rpb=inputs[3], backend=backend)
    reference_inputs = [x.double().requires_grad_() for x in (q, k, v, rpb)]
    ref = na2d_reference(*reference_inputs[:3], kernel_size, dilation, reference_inputs[3])
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-3)
    grad_out = torch.randn(q.shape)
    grads = torch.autograd.grad(out, inputs, grad_out.cuda())
    ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out.double())
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double().cpu(), ref_grad, atol=1e-3, rtol=1e-3)
