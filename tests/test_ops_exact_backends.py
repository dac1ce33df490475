"""The exact CPU backends of na2d (`torch`, and the compiled `cpu`) against the gather oracle.

The oracle is nat_mm.ops.reference. The `cpu` backend needs a C compiler: its tests skip only where
there is none, and fail where there is one and the kernel does not build.
"""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch

from nat_mm.ops import na2d
from nat_mm.ops.reference import na2d_reference, random_inputs

# (H, W, kernel_size, dilation): odd, non-square, H == K * d edges, per-axis settings, and
# uneven sub-lattices (H % d != 0).
CASES = [
    (9, 11, 3, 1),
    (3, 5, 3, 1),  # H == K
    (7, 7, 7, 1),  # H == W == K
    (16, 13, 5, 2),
    (20, 17, 5, 3),
    (14, 21, 7, 2),  # H == K * d
    (13, 30, 3, 4),
    (21, 22, 7, 3),  # W % d != 0
    (24, 25, 3, 8),  # H == K * d with d = 8
    (12, 19, (3, 5), (4, 2)),
    (11, 27, (5, 9), (2, 3)),
    (18, 19, 9, 2),
    (13, 16, 13, 1),
    (11, 11, 11, 1),
    (29, 26, 13, 2),  # H > K * d, W == K * d
]

# (atol, rtol) against the float64 oracle; gradients get twice these. float16 errors measured
# up to 2.8e-3 (relative to 1 + |ref|) on CASES: bf16's 8-bit mantissa would not pass.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

CPU_KERNEL = pytest.param('cpu', marks=pytest.mark.requires_cpu_kernel)
BACKENDS = ['torch', CPU_KERNEL]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def _run_case(
    height: int,
    width: int,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int],
    with_rpb: bool,
    dtype: torch.dtype,
    batch: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    check_grads: bool = True,
    backend: str = 'torch',
) -> None:
    kernel = _pair(kernel_size)
    q, k, v, rpb = random_inputs((batch, height, width, heads, head_dim), kernel, with_rpb, dtype)
    inputs = [x for x in (q, k, v, rpb) if x is not None]
    for x in inputs:
        x.requires_grad_(check_grads)
    reference_inputs = [x.detach().double().requires_grad_(check_grads) for x in inputs]
    ref_q, ref_k, ref_v = reference_inputs[:3]
    ref_rpb = reference_inputs[3] if with_rpb else None

    out = na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend=backend)
    ref = na2d_reference(ref_q, ref_k, ref_v, kernel_size, dilation, ref_rpb)
    assert out.dtype == dtype
    assert out.shape == q.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    if not check_grads:
        return
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out.double())
    for name, grad, ref_grad in zip('qkvr'[: len(grads)], grads, ref_grads, strict=True):
        # rpb gradients sum over every query: scale the tolerance with the magnitude.
        grad_atol = atol * (1 + ref_grad.abs().max().item()) if name == 'r' else atol
        torch.testing.assert_close(grad.double(), ref_grad, atol=grad_atol * 2, rtol=rtol * 2)


# A deterministic sample of (case x rpb x dtype): every case runs in fp32 with and without rpb;
# bf16 on a third of them. The full cross product is in test_exhaustive_sweep (slow).
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('with_rpb', [False, True], ids=['no_rpb', 'rpb'])
def test_matches_oracle_fp32(case: tuple, with_rpb: bool, backend: str) -> None:
    _run_case(*case, with_rpb=with_rpb, dtype=torch.float32, backend=backend)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', CASES[::3], ids=str)
def test_matches_oracle_bf16(case: tuple, backend: str) -> None:
    _run_case(*case, with_rpb=True, dtype=torch.bfloat16, backend=backend)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_matches_oracle_fp16(case: tuple, backend: str) -> None:
    # The AMP configs train in fp16 (on GPUs); both exact CPU backends run it too.
    _run_case(*case, with_rpb=True, dtype=torch.float16, backend=backend)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('head_dim', [3, 12, 32, 64])
def test_head_dims(head_dim: int, backend: str) -> None:
    """Head dims that are and are not whole vectors (the compiled kernel pads them)."""
    _run_case(
        15, 10, 5, 2, with_rpb=True, dtype=torch.float32, batch=1, heads=1,
        head_dim=head_dim, backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize('backend', BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    q, k, v, rpb = random_inputs((2, 12, 16, 3, 8), (5, 5), True)
    # Same values, transposed storage (and a sliced rpb) so no input is contiguous.
    q_nc, k_nc, v_nc = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    rpb_nc = torch.cat([rpb, rpb], dim=-1)[..., ::2][..., : rpb.shape[-1]]
    rpb_nc = rpb.repeat_interleave(2, dim=-1)[..., ::2]
    assert not q_nc.is_contiguous() and not rpb_nc.is_contiguous()
    out = na2d(q_nc, k_nc, v_nc, 5, 2, rpb=rpb_nc, backend=backend)
    ref = na2d_reference(q.double(), k.double(), v.double(), 5, 2, rpb.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('backend', BACKENDS)
def test_custom_scale(backend: str) -> None:
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 4), (3, 3), True)
    out = na2d(q, k, v, 3, 2, rpb=rpb, scale=0.7, backend=backend)
    ref = na2d_reference(q.double(), k.double(), v.double(), 3, 2, rpb.double(), 0.7)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize(
    ('height', 'width', 'kernel_size', 'dilation'),
    [(5, 7, 3, 1), (7, 6, 3, 2), (6, 9, (3, 3), (2, 3))],
)
def test_gradcheck_float64(height: int, width: int, kernel_size, dilation, backend: str) -> None:
    q, k, v, rpb = random_inputs((1, height, width, 2, 3), _pair(kernel_size), True, torch.float64)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, rpb))

    def function(q, k, v, rpb):
        return na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend=backend)

    assert torch.autograd.gradcheck(function, inputs, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize('backend', BACKENDS)
def test_exhaustive_sweep(backend: str) -> None:
    """Kernels 3..13 x dilations 1..8 x sizes from K*d to K*d + 5, sampled per (K, d)."""
    rng = random.Random(0)
    for kernel_size, dilation in itertools.product(range(3, 14, 2), range(1, 9)):
        edge = kernel_size * dilation
        if edge > 60:
            continue
        for _ in range(3):
            height, width = edge + rng.randrange(6), edge + rng.randrange(6)
            _run_case(
                height,
                width,
                kernel_size,
                dilation,
                rng.random() < 0.5,
                torch.float32,
                batch=1,
                heads=1,
                head_dim=4,
                backend=backend,
            )


def test_many_chunks_match_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """One tile row per chunk: chunk boundaries must not change the result or the gradients."""
    from nat_mm.ops.backends import torch_na

    monkeypatch.setattr(torch_na, 'CHUNK_ELEMENTS', 1)
    _run_case(23, 20, 5, 2, with_rpb=True, dtype=torch.float32)
    _run_case(19, 26, 3, 1, with_rpb=True, dtype=torch.float32)


@pytest.mark.parametrize('backend', BACKENDS)
def test_no_grad_path_matches_oracle(backend: str) -> None:
    q, k, v, rpb = random_inputs((2, 17, 14, 2, 8), (5, 5), True)
    with torch.no_grad():
        out = na2d(q, k, v, 5, (3, 2), rpb=rpb, backend=backend)
    ref = na2d_reference(q.double(), k.double(), v.double(), 5, (3, 2), rpb.double())
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ('height', 'width', 'kernel_size', 'dilation'),
    [(5, 7, 3, 1), (7, 6, 3, 2), (6, 9, (3, 3), (2, 3))],
)
def test_double_backward_torch_gradgradcheck(
    height: int, width: int, kernel_size, dilation
) -> None:
    """create_graph=True on the torch backend: second derivatives are exact (float64)."""
    q, k, v, rpb = random_inputs((1, height, width, 2, 3), _pair(kernel_size), True, torch.float64)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, rpb))

    def function(q, k, v, rpb):
        return na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend='torch')

    assert torch.autograd.gradgradcheck(function, inputs, fast_mode=True)


@pytest.mark.parametrize('dilation', [(2, 1), 1])
@pytest.mark.parametrize('shared_qkv', [False, True], ids=['q_k_v', 'x_x_x'])
def test_double_backward_torch_matches_oracle(dilation, shared_qkv: bool) -> None:
    """Gradient of a gradient norm (as in gradient penalties) equals the oracle's."""
    q, k, v, rpb = random_inputs((2, 11, 9, 2, 4), (5, 3), True, torch.float64)
    results = []
    for function in (na2d_reference, functools.partial(na2d, backend='torch')):
        # x_x_x: one tensor as q, k and v (each use must still get its own gradient).
        inputs = [x.clone().requires_grad_() for x in ((q, rpb) if shared_qkv else (q, k, v, rpb))]
        args = [inputs[0]] * 3 + inputs[1:] if shared_qkv else inputs
        out = function(*args[:3], (5, 3), dilation, args[3])
        grads = torch.autograd.grad(out.sin().sum(), inputs, create_graph=True)
        penalty = sum(grad.square().sum() for grad in grads)
        results.append(torch.autograd.grad(penalty, inputs))
    for grad, ref_grad in zip(*results, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=1e-8)
