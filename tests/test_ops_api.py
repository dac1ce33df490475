"""na2d input validation and backend dispatch (nat_mm.ops)."""

from __future__ import annotations

import pytest
import torch

import nat_mm.ops as ops
from nat_mm.ops import na2d
from nat_mm.ops.backends import BACKENDS, check_backend

# The automatic choice for float32 on CPU is the `auto_cpu_backend` fixture (tests/conftest.py):
# `cpu` wherever a C compiler exists, so a kernel that fails to build fails these tests.


def _qkv(shape=(1, 9, 10, 2, 4), dtype=torch.float32):
    return tuple(torch.randn(shape, dtype=dtype) for _ in range(3))


@pytest.fixture(autouse=True)
def _reset_default_backend():
    yield
    ops.set_default_backend(None)


@pytest.mark.parametrize(
    ('kwargs', 'error', 'match'),
    [
        ({'kernel_size': 4}, ValueError, 'kernel_size must be odd and >= 3'),
        ({'kernel_size': 1}, ValueError, 'kernel_size must be odd and >= 3'),
        ({'kernel_size': (3, 2)}, ValueError, 'kernel_size must be odd'),
        ({'kernel_size': 3.0}, TypeError, 'kernel_size must be an int or a pair'),
        ({'kernel_size': (3, 3, 3)}, TypeError, 'kernel_size must be an int or a pair'),
        ({'kernel_size': True}, TypeError, 'kernel_size must be an int or a pair'),
        ({'dilation': 0}, ValueError, 'dilation must be >= 1'),
        ({'dilation': (1, -1)}, ValueError, 'dilation must be >= 1'),
        ({'dilation': '2'}, TypeError, 'dilation must be an int or a pair'),
        ({'kernel_size': 11}, ValueError, r'H=9 must be >= kernel_size \* dilation = 11'),
        ({'dilation': (1, 4)}, ValueError, r'W=10 must be >= kernel_size \* dilation = 3 \* 4'),
        ({'rpb': torch.zeros(2, 3, 3)}, ValueError, r'rpb must have shape .*\[2, 5, 5\]'),
        ({'rpb': torch.zeros(3, 5, 5)}, ValueError, 'rpb must have shape'),
        ({'rpb': torch.zeros(2, 5, 5, dtype=torch.long)}, TypeError, 'rpb must have a floating'),
        ({'rpb': [[0.0]]}, TypeError, 'rpb must be a torch.Tensor'),
        ({'scale': 'x'}, TypeError, 'scale must be a real number'),
        ({'backend': 'cuda'}, ValueError, "backend must be one of .*'torch'"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    q, k, v = _qkv()
    arguments = {'kernel_size': 3, **kwargs}
    with pytest.raises(error, match=match):
        na2d(q, k, v, **arguments)


def test_bad_tensors() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r'q must be 5-D \[B, H, W, heads, head_dim\]'):
        na2d(q[0], k[0], v[0], 3)
    with pytest.raises(ValueError, match='k must have the shape of q'):
        na2d(q, k[:, :8], v, 3)
    with pytest.raises(ValueError, match='v must have the shape of q'):
        na2d(q, k, v[..., :2], 3)
    with pytest.raises(TypeError, match='k must have the dtype of q'):
        na2d(q, k.double(), v, 3)
    with pytest.raises(TypeError, match=r'v must be a torch\.Tensor'):
        na2d(q, k, v.numpy(), 3)
    with pytest.raises(TypeError, match='q must have a floating-point dtype'):
        na2d(*(x.long() for x in (q, k, v)), 3)
    meta = torch.empty(q.shape, device='meta')
    with pytest.raises(ValueError, match='k must be on the device of q'):
        na2d(q, meta, v, 3)


def test_available_backends_and_last_backend(auto_cpu_backend: str) -> None:
    assert 'torch' in ops.available_backends()
    assert set(ops.available_backends()) <= set(BACKENDS)
    q, k, v = _qkv()
    na2d(q, k, v, 3)
    assert ops.last_backend() == auto_cpu_backend


def test_forcing_a_backend_that_cannot_run_raises_with_reason() -> None:
    q, k, v = _qkv()
    rpb = torch.zeros(2, 5, 5)
    # NATTEN >= 0.20 has no RPB; if NATTEN is missing the reason says that instead.
    with pytest.raises(
        RuntimeError, match=r"backend 'natten' cannot run these inputs: .*(rpb|NATTEN)"
    ):
        na2d(q, k, v, 3, rpb=rpb, backend='natten')
    q.requires_grad_()
    with pytest.raises(RuntimeError, match=r"backend 'flex' cannot run these inputs: .*CPU"):
        na2d(q, k, v, 3, backend='flex')


def test_default_backend_and_context_manager(auto_cpu_backend: str) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match='name must be one of'):
        ops.set_default_backend('fast')
    ops.set_default_backend('natten')
    with ops.use_backend('torch'):
        na2d(q, k, v, 3)
        assert ops.last_backend() == 'torch'
    # Back to the forced default: natten cannot take an rpb, so the call now raises.
    with pytest.raises(RuntimeError, match="backend 'natten' cannot run"):
        na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5))
    ops.set_default_backend(None)
    na2d(q, k, v, 3)
    assert ops.last_backend() == auto_cpu_backend


def test_automatic_choice_is_logged_once(auto_cpu_backend: str) -> None:
    from nat_mm.ops import functional

    functional._logged_choices.clear()
    q, k, v = _qkv()
    messages = []
    original = functional.print_log
    functional.print_log = lambda message, **kwargs: messages.append(message)
    try:
        na2d(q, k, v, 3)
        na2d(q, k, v, 3)
    finally:
        functional.print_log = original
    # One message; without a C compiler it ends with "(skipped cpu: <why>)".
    assert len(messages) == 1
    assert messages[0].startswith(f"na2d: using backend '{auto_cpu_backend}' on cpu")


CPU_KERNEL = pytest.param('cpu', marks=pytest.mark.requires_cpu_kernel)
EMPTY_BACKENDS = [None, 'torch', CPU_KERNEL]


@pytest.mark.parametrize('backend', EMPTY_BACKENDS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_empty_batch_forward_and_backward(
    backend: str | None, dtype: torch.dtype, auto_cpu_backend: str
) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv((0, 9, 10, 2, 4), dtype))
    rpb = torch.randn(2, 5, 5, dtype=dtype, requires_grad=True)
    out = na2d(q, k, v, 3, (2, 3), rpb=rpb, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.requires_grad
    grads = torch.autograd.grad(out.sum(), (q, k, v, rpb))
    for grad, tensor in zip(grads, (q, k, v, rpb), strict=True):
        assert grad.shape == tensor.shape and grad.dtype == dtype
    assert torch.equal(grads[3], torch.zeros_like(rpb))
    assert ops.last_backend() == (backend or auto_cpu_backend)


@pytest.mark.parametrize('backend', ['natten', 'flex', CPU_KERNEL, 'torch'])
def test_empty_batch_without_grad_on_every_backend(backend: str) -> None:
    """Nothing to compute: even backends that need a compile or a package return at once."""
    q, k, v = _qkv((0, 9, 10, 2, 8))
    with torch.no_grad():
        reason = check_backend(backend, q, k, v, (3, 3), (1, 1), None)
        if reason is not None:
            pytest.skip(f'{backend} cannot run here: {reason}')
        out = na2d(q, k, v, 3, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_empty_heads_and_bf16() -> None:
    q, k, v = (x.requires_grad_() for x in _qkv((2, 9, 10, 0, 4), torch.bfloat16))
    rpb = torch.zeros(0, 5, 5, requires_grad=True)  # float32 table, as under autocast
    out = na2d(q, k, v, 3, rpb=rpb)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    out.sum().backward()
    assert q.grad.shape == q.shape and rpb.grad.shape == rpb.shape
