"""na2d's runtime fallback: an automatically chosen backend that fails to compile is replaced.

On CPU the automatic order is `cpu`, then `torch`; these tests make the compiled kernel's forward
raise (a compile error, as inductor / triton raise on CUDA, or a bug) and need the kernel chosen:
they skip only where no C compiler exists, and fail where one does and the kernel does not build.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import CppCompileError, InductorError

import nat_mm.ops as ops
from nat_mm.ops import functional, na2d
from nat_mm.ops.backends import cpu_na, torch_na
from nat_mm.ops.reference import random_inputs

pytestmark = pytest.mark.requires_cpu_kernel  # the kernel must be the first choice


@pytest.fixture
def failing_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list, list]]:
    """The `cpu` backend's forward fails to compile. Yields (its calls' dtypes, log entries)."""
    calls = []

    def fail(q, *args):
        calls.append(q.dtype)
        raise InductorError(RuntimeError('inductor failed\nlong compiler output'), None)

    monkeypatch.setattr(cpu_na, 'forward', fail)
    monkeypatch.setattr(functional, '_failed', {})
    monkeypatch.setattr(functional, '_logged_choices', set())
    log = []
    monkeypatch.setattr(
        functional, 'print_log', lambda message, logger, level: log.append((level, message))
    )
    yield calls, log
    ops.set_default_backend(None)


def _inputs(dtype=torch.float32, head_dim=4):
    q, k, v, rpb = random_inputs((2, 11, 10, 2, head_dim), (3, 3), True, dtype)
    return [x.requires_grad_() for x in (q, k, v, rpb)]


def _raise(error: Exception):
    def forward(*args):
        raise error

    return forward


def test_falls_back_to_the_next_backend_and_remembers(failing_cpu) -> None:
    calls, log = failing_cpu
    q, k, v, rpb = _inputs()
    out = na2d(q, k, v, 3, 2, rpb=rpb)
    expected = na2d(q, k, v, 3, 2, rpb=rpb, backend='torch')
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert ops.last_backend() == 'torch'
    warnings = [message for level, message in log if level == logging.WARNING]
    assert len(warnings) == 1
    assert "'cpu' raised" in warnings[0] and 'RuntimeError: inductor failed' in warnings[0]
    assert "using 'torch'" in warnings[0] and 'long compiler output' not in warnings[0]
    # The choice that was actually made is logged, with the reason for skipping `cpu`.
    assert any("using backend 'torch'" in message and 'inductor failed' in message
               for level, message in log if level == logging.INFO)  # fmt: skip
    # Gradients come from the backend that ran.
    out.sum().backward()
    assert q.grad is not None and rpb.grad is not None

    # Later calls of this configuration skip `cpu` without retrying, and log nothing new.
    log.clear()
    na2d(q, k, v, 5, 1, rpb=torch.zeros(2, 9, 9, requires_grad=True))  # other kernel, same key
    na2d(q, k, v, 3, 2, rpb=rpb)
    assert len(calls) == 1 and ops.last_backend() == 'torch'
    assert not [message for level, message in log if level == logging.WARNING]


def test_failure_is_remembered_per_configuration(failing_cpu) -> None:
    calls, log = failing_cpu
    na2d(*_inputs()[:3], 3)  # no rpb
    na2d(*_inputs()[:3], 3)
    assert len(calls) == 1
    q, k, v, rpb = _inputs(torch.float64)
    na2d(q, k, v, 3, rpb=rpb)  # another dtype: tried again
    na2d(*_inputs(head_dim=8)[:3], 3)  # another head_dim
    with torch.no_grad():
        na2d(*_inputs()[:3], 3)  # no gradients: another compiled kernel on CUDA
    assert calls == [torch.float32, torch.float64, torch.float32, torch.float32]
    assert len([1 for level, _ in log if level == logging.WARNING]) == 4


def test_forced_backend_raises(failing_cpu) -> None:
    calls, log = failing_cpu
    q, k, v, rpb = _inputs()
    with pytest.raises(RuntimeError, match='inductor failed'):
        na2d(q, k, v, 3, rpb=rpb, backend='cpu')
    with ops.use_backend('cpu'), pytest.raises(RuntimeError, match='inductor failed'):
        na2d(q, k, v, 3, rpb=rpb)
    ops.set_default_backend('cpu')
    with pytest.raises(RuntimeError, match='inductor failed'):
        na2d(q, k, v, 3, rpb=rpb)
    assert len(calls) == 3 and not functional._failed and not log


def test_the_last_backend_raises_its_own_error(failing_cpu, monkeypatch) -> None:
    def also_fail(*args):
        raise ValueError('torch failed too')

    monkeypatch.setattr(torch_na, 'forward', also_fail)
    with pytest.raises(ValueError, match='torch failed too'):
        na2d(*_inputs()[:3], 3)


def test_out_of_memory_is_raised_not_remembered(failing_cpu, monkeypatch) -> None:
    def out_of_memory(*args):
        raise torch.OutOfMemoryError('CUDA out of memory')

    monkeypatch.setattr(cpu_na, 'forward', out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        na2d(*_inputs()[:3], 3)
    assert not functional._failed


def test_validation_errors_are_not_backend_failures(failing_cpu) -> None:
    calls, _ = failing_cpu
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match='kernel_size must be odd'):
        na2d(q, k, v, 4)
    assert not calls and not functional._failed


@pytest.mark.parametrize(
    'error',
    [
        BackendCompilerFailed(torch.compile, RuntimeError('no kernel'), None),
        CppCompileError(['cc', 'na2d.c'], 'error: undeclared'),
    ],
    ids=['BackendCompilerFailed', 'CppCompileError'],
)
def test_other_compile_errors_fall_back(failing_cpu, monkeypatch, error) -> None:
    _, log = failing_cpu
    monkeypatch.setattr(cpu_na, 'forward', _raise(error))
    na2d(*_inputs()[:3], 3)
    assert ops.last_backend() == 'torch'
    warnings = [message for level, message in log if level == logging.WARNING]
    assert len(warnings) == 1 and type(error).__name__ in warnings[0]


def test_triton_errors_fall_back(failing_cpu, monkeypatch) -> None:
    class TritonError(Exception):
        pass

    class OutOfResources(TritonError):
        pass

    # A stand-in for triton, which the CPU build of torch does not bring.
    errors = types.ModuleType('triton.errors')
    errors.TritonError = TritonError
    monkeypatch.setitem(sys.modules, 'triton.errors', errors)
    monkeypatch.setattr(cpu_na, 'forward', _raise(OutOfResources('out of resource: shared memory')))
    na2d(*_inputs()[:3], 3)
    assert ops.last_backend() == 'torch' and len(functional._failed) == 1


@pytest.mark.parametrize(
    'error',
    [IndexError('index 9 is out of bounds'), TypeError('bad'), RuntimeError('shape mismatch')],
    ids=['IndexError', 'TypeError', 'RuntimeError'],
)
def test_other_errors_are_raised_not_remembered(failing_cpu, monkeypatch, error) -> None:
    _, log = failing_cpu
    monkeypatch.setattr(cpu_na, 'forward', _raise(error))
    for _ in range(2):  # raised every time: the backend is not skipped later
        with pytest.raises(type(error), match=str(error)):
            na2d(*_inputs()[:3], 3)
    assert not functional._failed and not log
