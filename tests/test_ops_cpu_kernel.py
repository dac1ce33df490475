"""The compiled CPU backend's own concerns: threads, float64, building, falling back.

Its exactness against the oracle is in test_ops_exact_backends.py, shared with `torch`.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from nat_mm import ops
from nat_mm.ops import na2d
from nat_mm.ops.backends import cpu_na
from nat_mm.ops.reference import na2d_reference, random_inputs

needs_kernel = pytest.mark.skipif(
    cpu_na.unavailable_reason() is not None,
    reason=f'compiled CPU kernel unavailable: {cpu_na.unavailable_reason()}',
)


@pytest.fixture
def fresh_library():
    """Forget the loaded kernel before and after the test (it rebuilds / reloads from the cache
    the environment points at)."""
    cpu_na._library.cache_clear()
    yield
    cpu_na._library.cache_clear()


def _grads(threads: int, dtype: torch.dtype, shape, kernel_size, dilation):
    q, k, v, rpb = (x.requires_grad_() for x in random_inputs(shape, kernel_size, True, dtype))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = na2d(q, k, v, kernel_size, dilation, rpb=rpb, backend='cpu')
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
        return (out, *torch.autograd.grad(out, (q, k, v, rpb), grad_out))
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize(
    ('shape', 'kernel_size', 'dilation'),
    [
        ((2, 61, 23, 3, 8), (3, 3), (1, 1)),  # ten row stripes per (batch, head)
        ((1, 67, 30, 2, 8), (5, 3), (3, 2)),  # stripes on each of three sub-lattices
        ((1, 9, 40, 1, 8), (3, 7), (3, 5)),  # fewer stripes than threads
    ],
    ids=['stripes', 'dilated-stripes', 'one-stripe'],
)
def test_threads_give_the_one_thread_result(shape, kernel_size, dilation) -> None:
    """Parallel backward items never write the same key and the RPB gradient is summed in a fixed
    order (see na2d_cpu_impl.h): any number of threads gives the same bits, run after run."""
    one = _grads(1, torch.float64, shape, kernel_size, dilation)
    for threads in (4, 3, 4):
        parallel = _grads(threads, torch.float64, shape, kernel_size, dilation)
        for single, result in zip(one, parallel, strict=True):
            assert torch.equal(result, single)
    q, k, v, rpb = random_inputs(shape, kernel_size, True, torch.float64)
    reference = na2d_reference(q, k, v, kernel_size, dilation, rpb)
    torch.testing.assert_close(one[0], reference, atol=1e-12, rtol=1e-12)


@needs_kernel
def test_loading_the_kernel_keeps_subnormal_floats() -> None:
    """The kernel is compiled with -ffast-math but not linked with it: linking would turn on
    flush-to-zero for the whole process (crtfastmath.o) and change every later float op."""
    assert cpu_na.unavailable_reason() is None  # loaded
    tiny = torch.tensor([1e-38], dtype=torch.float32) / 1000  # subnormal, not zero
    assert tiny.item() != 0.0
    q, k, v, rpb = random_inputs((1, 5, 5, 1, 8), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb, backend='cpu')
    assert (torch.tensor([1e-38], dtype=torch.float32) / 1000).item() != 0.0


@needs_kernel
def test_float64_is_exact_to_rounding() -> None:
    q, k, v, rpb = random_inputs((2, 14, 21, 2, 16), (7, 7), True, torch.float64)
    out = na2d(q, k, v, 7, (2, 3), rpb=rpb, backend='cpu')
    reference = na2d_reference(q, k, v, 7, (2, 3), rpb)
    assert (out - reference).abs().max().item() < 1e-13


@needs_kernel
def test_automatic_choice_on_cpu() -> None:
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 8), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb)
    assert ops.last_backend() == 'cpu'
    na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, rpb=rpb)
    assert ops.last_backend() == 'torch'  # the kernel takes float32 / float64 only
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .*bfloat16"):
        na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, backend='cpu')
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .*head_dim <= 256"):
        wide = torch.zeros(1, 3, 3, 1, 257)
        na2d(wide, wide, wide, 3, backend='cpu')


def test_without_a_compiler_na2d_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, fresh_library: None
) -> None:
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
    monkeypatch.setenv('NAT_MM_CACHE', str(tmp_path))
    reason = cpu_na.unavailable_reason()
    assert reason is not None and 'no C compiler found' in reason
    assert 'cpu' not in ops.available_backends()
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 8), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb)
    assert ops.last_backend() == 'torch'
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .*no C compiler"):
        na2d(q, k, v, 3, rpb=rpb, backend='cpu')


def test_a_failing_build_reports_the_compiler_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, fresh_library: None
) -> None:
    compiler = tmp_path / 'broken-cc'
    compiler.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && exit 0\necho "fatal: out of ink" >&2\nexit 1\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv('CC', str(compiler))
    monkeypatch.setenv('NAT_MM_CACHE', str(tmp_path / 'cache'))
    reason = cpu_na.unavailable_reason()
    assert reason is not None and 'building the CPU kernel failed' in reason
    assert 'out of ink' in reason
    assert not list((tmp_path / 'cache' / 'kernels').glob('*.so'))  # nothing half-written


@needs_kernel
def test_build_is_cached_by_source_and_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, fresh_library: None
) -> None:
    monkeypatch.setenv('NAT_MM_CACHE', str(tmp_path))
    assert cpu_na.unavailable_reason() is None
    built = list((tmp_path / 'kernels').glob('na2d_cpu_*.so'))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_na._library.cache_clear()
    assert cpu_na.unavailable_reason() is None  # found in the cache, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert list((tmp_path / 'kernels').iterdir()) == built  # no scratch left behind
