"""Non-finite inputs stay in their windows: a NaN / inf reaches only the queries that see it.

Per-query attention (the oracle, and the `cpu` kernel, which visits only each query's window) lets
a non-finite key or value reach just the queries whose window holds it, and a non-finite query
only itself. The tiled `torch` backend computes masked logits outside the windows too, so it must
switch to a per-query path for such inputs (nat_mm/ops/backends/torch_na.py).
"""

from __future__ import annotations

import pytest
import torch

from nat_mm.ops import na2d
from nat_mm.ops.backends import torch_na
from nat_mm.ops.reference import na2d_reference, random_inputs, window_indices

CPU_KERNEL = pytest.param('cpu', marks=pytest.mark.requires_cpu_kernel)
BACKENDS = ['torch', CPU_KERNEL]
# (H, W, kernel_size, dilation), with the planted element at pixel (6, 5).
CASES = [(13, 12, 3, 1), (22, 25, (5, 3), (2, 3))]
PLANT = (6, 5)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def _queries_seeing(height: int, width: int, kernel_size, dilation) -> torch.Tensor:
    """[H, W] bool: the queries whose window holds the key at PLANT (from the oracle's rule)."""
    (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
    rows, _ = window_indices(height, kh, dh)
    cols, _ = window_indices(width, kw, dw)
    return (rows == PLANT[0]).any(1)[:, None] & (cols == PLANT[1]).any(1)[None, :]


def _planted_inputs(case, where: str, value: float, requires_grad: bool = False):
    height, width, kernel_size, _ = case
    q, k, v, rpb = random_inputs((2, height, width, 2, 4), _pair(kernel_size), True)
    tensor = {'q': q, 'k': k, 'v': v}[where]
    tensor[1, PLANT[0], PLANT[1], 0, 2] = value  # batch 1, head 0, one channel
    return [x.requires_grad_(requires_grad) for x in (q, k, v, rpb)]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('where', ['q', 'k', 'v'])
@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')], ids=str)
def test_non_finite_input_reaches_only_its_windows(backend, case, where, value) -> None:
    q, k, v, rpb = _planted_inputs(case, where, value)
    height, width, kernel_size, dilation = case
    out = na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend=backend)
    ref = na2d_reference(q.double(), k.double(), v.double(), kernel_size, dilation, rpb.double())
    bad, ref_bad = ~out.isfinite(), ~ref.isfinite()
    # Only head 0 of batch 1, only the queries that see the planted element, can be hit.
    if where == 'q':
        reach = torch.zeros(height, width, dtype=torch.bool)
        reach[PLANT] = True
    else:
        reach = _queries_seeing(height, width, kernel_size, dilation)
    allowed = torch.zeros_like(bad)
    allowed[1, :, :, 0] = reach[..., None]
    assert not (ref_bad & ~allowed).any(), 'the oracle itself leaks'
    assert torch.equal(bad, ref_bad), f'non-finite outputs: {bad.sum()} vs oracle {ref_bad.sum()}'
    if value != value or where == 'v':
        # A NaN (anywhere) or an inf value poisons every query that sees it.
        assert torch.equal(ref_bad.any(-1)[1, :, :, 0], reach)
    torch.testing.assert_close(
        torch.where(bad, 0, out).double(), torch.where(ref_bad, 0, ref), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('where', ['q', 'k', 'v'])
def test_gradients_flow_past_a_nan(backend: str, where: str) -> None:
    """The loss over the finite outputs has the oracle's gradients, finite outside the windows."""
    case = CASES[1]
    _, _, kernel_size, dilation = case
    inputs = _planted_inputs(case, where, float('nan'), requires_grad=True)
    reference_inputs = [x.detach().double().requires_grad_() for x in inputs]
    out = na2d(*inputs[:3], kernel_size, dilation, rpb=inputs[3], backend=backend)
    ref = na2d_reference(*reference_inputs[:3], kernel_size, dilation, reference_inputs[3])
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    finite = ref.isfinite()
    loss = (torch.where(finite, out, 0) * weight).sum()
    ref_loss = (torch.where(finite, ref, 0) * weight.double()).sum()
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, reference_inputs)
    for grad, ref_grad in zip(grads[:3], ref_grads[:3], strict=True):
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-4, rtol=1e-3, equal_nan=True)
        # Batch 0 never sees the NaN: its gradients are all finite and nonzero somewhere.
        assert grad[0].isfinite().all() and grad[0].abs().sum() > 0
    assert grads[2][1].isfinite().float().mean() > 0.5  # most of batch 1 too


def test_finite_inputs_keep_the_tiled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args):
        raise AssertionError('finite inputs must not take the gather path')

    monkeypatch.setattr(torch_na, '_gather_attention', refuse)
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 4), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb, backend='torch')


def test_gather_path_in_row_chunks_matches_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking the per-query path over rows (to bound memory) changes nothing."""
    _, _, kernel_size, dilation = CASES[1]
    q, k, v, rpb = _planted_inputs(CASES[1], 'k', float('nan'))
    whole = na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend='torch')
    monkeypatch.setattr(torch_na, 'GATHER_ELEMENTS', 1)  # one query row per chunk
    rows = na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend='torch')
    torch.testing.assert_close(rows, whole, equal_nan=True, atol=0, rtol=0)


def test_non_finite_rpb_reaches_only_queries_using_that_offset() -> None:
    q, k, v, rpb = random_inputs((1, 9, 10, 2, 4), (3, 3), True)
    rpb[0, 0, 0] = float('nan')  # offset (-1, -1): used by queries not on the top / left edge
    out = na2d(q, k, v, 3, rpb=rpb, backend='torch')
    ref = na2d_reference(q, k, v, 3, rpb=rpb)
    assert torch.equal(out.isnan(), ref.isnan())
    assert ref.isnan().any() and not ref[..., 1, :].isnan().any()
