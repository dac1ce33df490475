"""The compiled CPU backend's own concerns: threads and chunks, float64, what it saves, double
backward, building (also for CPUs without AVX-512), falling back.

Its exactness against the oracle is in test_ops_exact_backends.py, shared with `torch`; bfloat16
and float16 are in test_ops_cpu_dtypes.py. Tests marked `requires_cpu_kernel` skip only where no C
compiler exists; with one, a kernel that does not build fails them (tests/conftest.py).
"""

from __future__ import annotations

import pathlib
import platform

import pytest
import torch

from nat_mm import ops
from nat_mm.ops import functional, na2d
from nat_mm.ops.backends import cpu_na
from nat_mm.ops.reference import na2d_reference, random_inputs


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


@pytest.mark.requires_cpu_kernel
@pytest.mark.parametrize(
    ('shape', 'kernel_size', 'dilation'),
    [
        ((2, 61, 23, 3, 8), (3, 3), (1, 1)),  # six row sub-lattices
        ((1, 67, 30, 2, 8), (5, 3), (3, 2)),  # three per head
        ((1, 9, 40, 1, 8), (3, 7), (3, 5)),  # fewer than threads: split into chunks
    ],
    ids=['sub-lattices', 'dilated', 'chunks'],
)
def test_threads_give_the_one_thread_result(shape, kernel_size, dilation) -> None:
    """Backward items never write the same memory and the RPB gradient is summed in a fixed order
    (see na2d_cpu_impl.h): any number of threads gives the same bits, run after run."""
    one = _grads(1, torch.float64, shape, kernel_size, dilation)
    for threads in (4, 3, 4):
        parallel = _grads(threads, torch.float64, shape, kernel_size, dilation)
        for single, result in zip(one, parallel, strict=True):
            assert torch.equal(result, single)
    q, k, v, rpb = random_inputs(shape, kernel_size, True, torch.float64)
    reference = na2d_reference(q, k, v, kernel_size, dilation, rpb)
    torch.testing.assert_close(one[0], reference, atol=1e-12, rtol=1e-12)


@pytest.mark.requires_cpu_kernel
def test_loading_the_kernel_keeps_subnormal_floats() -> None:
    """The kernel is compiled with -ffast-math but not linked with it: linking would turn on
    flush-to-zero for the whole process (crtfastmath.o) and change every later float op."""
    assert cpu_na.unavailable_reason() is None  # loaded
    tiny = torch.tensor([1e-38], dtype=torch.float32) / 1000  # subnormal, not zero
    assert tiny.item() != 0.0
    q, k, v, rpb = random_inputs((1, 5, 5, 1, 8), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb, backend='cpu')
    assert (torch.tensor([1e-38], dtype=torch.float32) / 1000).item() != 0.0


@pytest.mark.requires_cpu_kernel
def test_float64_is_exact_to_rounding() -> None:
    q, k, v, rpb = random_inputs((2, 14, 21, 2, 16), (7, 7), True, torch.float64)
    out = na2d(q, k, v, 7, (2, 3), rpb=rpb, backend='cpu')
    reference = na2d_reference(q, k, v, 7, (2, 3), rpb)
    assert (out - reference).abs().max().item() < 1e-13


@pytest.mark.requires_cpu_kernel
def test_automatic_choice_on_cpu() -> None:
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 8), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb)
    assert ops.last_backend() == 'cpu'
    na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, rpb=rpb)
    assert ops.last_backend() == 'cpu'
    big = random_inputs((1, 17, 17, 1, 8), (17, 17), False)[:3]
    na2d(*big, 17)
    assert ops.last_backend() == 'torch'  # 17 * 17 > 256 window slots
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .*Kh \* Kw <= 256"):
        na2d(*big, 17, backend='cpu')
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .*head_dim <= 256"):
        wide = torch.zeros(1, 3, 3, 1, 257)
        na2d(wide, wide, wide, 3, backend='cpu')


@pytest.mark.requires_cpu_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_any_chunking_gives_the_same_bits(dtype: torch.dtype) -> None:
    """The backward may split a row sub-lattice into chunks that recompute the query rows around
    them: 1 to 9 chunks of 10 rows (some empty) give identical gradients."""
    shape, kernel_size, dilation = (1, 20, 17, 2, 32), (7, 5), (2, 3)
    q, k, v, rpb = random_inputs(shape, kernel_size, True, dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    kernel_rpb = cpu_na._kernel_rpb(rpb, dtype)

    def grads(chunks: int) -> tuple:
        return cpu_na._backward(
            q, k, v, kernel_rpb, grad_out, kernel_size, dilation, 0.3, True, chunks=chunks
        )

    one = grads(1)
    for chunks in (2, 3, 9):
        for single, result in zip(one, grads(chunks), strict=True):
            assert torch.equal(result, single)


@pytest.mark.requires_cpu_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_qkv_views_are_read_in_place(dtype: torch.dtype) -> None:
    """q, k, v as views of one qkv projection (a pixel's channels 3 * heads * head_dim apart) are
    neither copied for the forward nor saved as copies, and give the bits of contiguous inputs."""
    batch, height, width, heads, head_dim = 2, 15, 16, 3, 32
    qkv = torch.randn(batch, height, width, 3, heads, head_dim).to(dtype).requires_grad_()
    views = qkv.unbind(3)
    assert all(x is y for x, y in zip(cpu_na._kernel_inputs(*views), views, strict=True))
    out = na2d(*views, 7, 2, backend='cpu')
    saved = out.grad_fn.saved_tensors
    assert [x.data_ptr() for x in saved[:3]] == [x.data_ptr() for x in views]
    copies = [x.detach().contiguous().requires_grad_() for x in views]
    reference = na2d(*copies, 7, 2, backend='cpu')
    assert torch.equal(out, reference)
    grad_out = torch.randn(out.shape).to(dtype)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    for view_grad, copy_grad in zip(
        grad.unbind(3), torch.autograd.grad(reference, copies, grad_out), strict=True
    ):
        assert torch.equal(view_grad, copy_grad)


@pytest.mark.requires_cpu_kernel
def test_saves_only_its_inputs() -> None:
    """The backward recomputes the attention weights: nothing but q, k, v and the rpb is kept."""
    q, k, v, rpb = (x.requires_grad_() for x in random_inputs((1, 9, 9, 2, 32), (3, 3), True))
    out = na2d(q, k, v, 3, rpb=rpb, backend='cpu')
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 4 and all(x is y for x, y in zip(saved, (q, k, v, rpb), strict=True))


@pytest.mark.requires_cpu_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=str)
def test_wide_logits_are_exact(dtype: torch.dtype) -> None:
    """Logits spread over hundreds (probabilities down to e^-300 and flushed below): the inline
    exp of the softmax is exact to the rounding of such logits (|logit| * eps)."""
    q, k, v, rpb = random_inputs((1, 14, 15, 2, 32), (7, 7), True, dtype)
    out = na2d(q, k, v, 7, 2, rpb=rpb * 50, scale=20.0, backend='cpu')
    ref = na2d_reference(q.double(), k.double(), v.double(), 7, 2, rpb.double() * 50, 20.0)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), ref, atol=tolerance, rtol=tolerance)


@pytest.mark.requires_cpu_kernel
def test_double_backward_differentiates_the_torch_backend() -> None:
    """create_graph=True (a gradient penalty, gradgradcheck) runs through the `torch` backend:
    second derivatives are exact, never silently zero."""
    shape = (1, 7, 6, 2, 3)
    q, k, v, rpb = (x.requires_grad_() for x in random_inputs(shape, (3, 3), True, torch.float64))

    def function(q, k, v, rpb):
        return na2d(q, k, v, 3, 2, rpb=rpb, backend='cpu')

    assert torch.autograd.gradgradcheck(function, (q, k, v, rpb), fast_mode=True)

    def penalty(backend: str) -> tuple[torch.Tensor, ...]:
        out = na2d(q, k, v, 3, 2, rpb=rpb, backend=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v, rpb))

    for grad, reference in zip(penalty('cpu'), penalty('torch'), strict=True):
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, reference, atol=1e-12, rtol=1e-10)


@pytest.mark.requires_cpu_kernel
def test_double_backward_with_one_tensor_as_q_k_and_v() -> None:
    """na2d(x, x, x): each of q, k, v gets its own share of the gradient, not the whole once per
    input (the replay separates the saved inputs); against the oracle, first and second order."""
    (x,) = (
        t.requires_grad_() for t in random_inputs((1, 9, 9, 2, 8), (3, 3), False, torch.float64)[:1]
    )

    def penalty(attention) -> tuple[torch.Tensor, torch.Tensor]:
        (grad,) = torch.autograd.grad(attention(x).sin().sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), x)
        return grad.detach(), second

    got = penalty(lambda t: na2d(t, t, t, 3, 2, backend='cpu'))
    expected = penalty(lambda t: na2d_reference(t, t, t, 3, 2))
    for grad, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-10, rtol=1e-10)


@pytest.mark.requires_cpu_kernel
@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'), reason='x86 flags')
@pytest.mark.parametrize(
    'flags', [('-mno-avx512f',), ('-march=x86-64',)], ids=['avx2', 'sse2-generic']
)
def test_builds_without_avx512(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, fresh_library: None, flags
) -> None:
    """Built for a CPU without AVX-512 (32-byte vectors; no F16C / AVX either: GCC's generic
    vectors and _Float16), the kernel is exact in every dtype it offers."""
    monkeypatch.setenv('NAT_MM_CACHE', str(tmp_path))
    monkeypatch.setattr(cpu_na, 'COMPILE_FLAGS', (*cpu_na.COMPILE_FLAGS, *flags))
    assert cpu_na.unavailable_reason() is None
    for dtype, tolerance in (
        (torch.float32, 2e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2),
        (torch.float16, 3e-3),
    ):  # fmt: skip
        if cpu_na.can_run(torch.empty(0, dtype=dtype), None, None, (7, 7), (1, 1), None):
            assert dtype == torch.float16  # a compiler without _Float16
            continue
        inputs = [
            x.requires_grad_() for x in random_inputs((1, 14, 15, 2, 32), (7, 7), True, dtype)
        ]
        out = na2d(*inputs[:3], 7, 2, rpb=inputs[3], backend='cpu')
        ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
        ref = na2d_reference(*ref_inputs[:3], 7, 2, ref_inputs[3])
        torch.testing.assert_close(out.double(), ref, atol=tolerance, rtol=tolerance)
        grad_out = torch.randn(out.shape).to(dtype)
        grads = torch.autograd.grad(out, inputs, grad_out)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            scale = max(1.0, ref_grad.abs().max().item())
            torch.testing.assert_close(
                grad.double(), ref_grad, atol=2 * tolerance * scale, rtol=2 * tolerance
            )


def _automatic_choice_and_its_log(monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    """na2d's automatic backend for float32 CPU inputs, and what it logged about the choice."""
    messages = []
    monkeypatch.setattr(functional, '_logged_choices', set())  # log this choice even if seen
    monkeypatch.setattr(functional, 'print_log', lambda message, **_: messages.append(message))
    q, k, v, rpb = random_inputs((1, 9, 9, 2, 8), (3, 3), True)
    na2d(q, k, v, 3, rpb=rpb)
    return ops.last_backend(), messages


def _assert_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """README.md's fallback without a compiler: `torch`, with the reason in the log."""
    reason = cpu_na.unavailable_reason()
    assert reason is not None and reason.startswith('no C compiler found'), reason
    assert 'cpu' not in ops.available_backends()
    backend, messages = _automatic_choice_and_its_log(monkeypatch)
    assert backend == 'torch'
    assert messages == [f"na2d: using backend 'torch' on cpu (skipped cpu: {reason})"]
    q = torch.zeros(1, 9, 9, 2, 8)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run .*no C compiler"):
        na2d(q, q, q, 3, backend='cpu')


def test_the_kernel_builds_and_is_chosen_wherever_a_compiler_exists(
    monkeypatch: pytest.MonkeyPatch, c_compiler: str | None
) -> None:
    """Never skipped: with a C compiler the kernel must build and be na2d's automatic choice on
    CPU (a build failure fails here, whatever else skips); without one, the torch fallback."""
    if c_compiler is None:
        _assert_falls_back_to_torch(monkeypatch)
        return
    reason = cpu_na.unavailable_reason()
    assert reason is None, f'{c_compiler} is present but the CPU kernel does not build: {reason}'
    assert 'cpu' in ops.available_backends()
    backend, messages = _automatic_choice_and_its_log(monkeypatch)
    assert backend == 'cpu'
    assert messages == ["na2d: using backend 'cpu' on cpu"]


def test_without_a_compiler_na2d_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, fresh_library: None
) -> None:
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
    monkeypatch.setenv('NAT_MM_CACHE', str(tmp_path))
    _assert_falls_back_to_torch(monkeypatch)


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


@pytest.mark.requires_cpu_kernel
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
