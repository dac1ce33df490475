"""The natten and flex backends of na2d against the gather oracle on CPU (forward only)."""

from __future__ import annotations

import pytest
import torch

from nat_mm.ops import na2d
from nat_mm.ops.backends import check_backend
from nat_mm.ops.reference import na2d_reference, random_inputs

# (H, W, kernel_size, dilation, with_rpb)
NATTEN_CASES = [(9, 11, 3, 1), (20, 17, 5, 3), (12, 19, (3, 5), (4, 2))]
# Flex compiles for CPU on its first call (15 s to a minute on 2 busy cores; a few sizes recompile
# once more, see tests/test_ops_cuda.py): one undilated case by default, the others under -m slow.
# The CUDA cases of every backend are in tests/test_ops_cuda.py.
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


def _check_forward(backend, height, width, kernel_size, dilation, with_rpb):
    q, k, v, rpb = random_inputs((2, height, width, 2, 16), _pair(kernel_size), with_rpb)
    ref = na2d_reference(
        q.double(),
        k.double(),
        v.double(),
        kernel_size,
        dilation,
        rpb.double() if with_rpb else None,
    )
    with torch.no_grad():
        out = na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def _skip_unless_runs(backend: str) -> None:
    q = torch.zeros(1, 9, 9, 2, 16)
    with torch.no_grad():
        reason = check_backend(backend, q, q, q, (3, 3), (1, 1), None)
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
