"""`na2d`: exact 2-D (dilated) neighborhood attention with pluggable backends.

Semantics: NATTEN 0.14, as docs/neighborhood-attention.md sections 1-2 state them: windows shift
inward at borders, dilation = independent sub-lattices, RPB index `(key - query) // d + K - 1`.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import sys
from collections.abc import Iterator

import torch
from mmengine.logging import print_log
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .backends import BACKENDS, backend_names, capable_backends, check_backend
from .traced import TracedNeighborhoodAttention2D

_default_backend: str | None = None
_last_backend: str | None = None
_logged_choices: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
# Automatically chosen backends whose forward failed to compile, per configuration (see
# `_configuration`): the reason. Later calls of that configuration skip them without retrying.
_failed: dict[tuple[object, ...], str] = {}
# (module, class) of the errors na2d falls back on: a compiler that cannot build this
# configuration's kernel. Any other error is a bug and must not become a silent slowdown.
_COMPILE_ERRORS: tuple[tuple[str, str], ...] = (
    ('torch._dynamo.exc', 'BackendCompilerFailed'),  # and inductor's InductorError
    ('torch._dynamo.exc', 'Unsupported'),
    ('torch._dynamo.exc', 'InternalTorchDynamoError'),
    ('torch._inductor.exc', 'OperatorIssue'),  # LoweringException, MissingOperator*
    ('torch._inductor.exc', 'SubgraphLoweringException'),
    ('torch._inductor.exc', 'InvalidCxxCompiler'),
    ('torch._inductor.exc', 'CppWrapperCodegenError'),
    ('torch._inductor.exc', 'CppCompileError'),  # and CUDACompileError
    ('torch._inductor.exc', 'TritonMissing'),
    ('torch._inductor.exc', 'GPUTooOldForTriton'),
    ('torch._inductor.select_algorithm', 'NoValidChoicesError'),
    ('torch._inductor.runtime.triton_heuristics', 'NoTritonConfigsError'),
    ('triton.errors', 'TritonError'),  # CompilationError, OutOfResources, ... (triton >= 3.2)
    ('triton.compiler.errors', 'CompilationError'),
    ('triton.runtime.errors', 'OutOfResources'),
)


def na2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """2-D neighborhood attention: each query attends its Kh x Kw (dilated) window.

    q is multiplied by `scale`, then `q . k` plus the RPB gives the logits, softmax runs over the
    window, and the weights average v (docs/neighborhood-attention.md sections 1-2). The caller
    pads maps smaller than `kernel_size * dilation` (section 3). Empty inputs (B = 0) give an
    empty output whose backward gives empty gradients to q, k, v and zeros to rpb.

    Automatic choice: the best capable backend in the device's priority order (README.md's
    backend table). If its forward fails to compile (a dynamo / inductor / triton error, e.g. a
    head_dim the GPU's shared memory does not take: `_COMPILE_ERRORS`), na2d logs the reason once
    as a WARNING, remembers the failure for that configuration (backend, device type, dtype,
    head_dim, RPB or not, gradients or not) and runs the next capable backend, now and on later
    calls. Any other error is raised: out of memory (it depends on the size, not on the
    configuration) and a backend's bug alike. An error in a backward cannot be caught at forward
    time: it is raised. A forced backend never falls back.

    Captured into a graph (torch.compile, torch.export, make_fx: `capturing_graph`), na2d is the
    one operator `torch.ops.nat_mm.na2d` (`library.py`): no graph break, and the same choice and
    fallback happen when the graph runs, on the device it runs on. Its gradients are an operator
    too (once differentiable: double backward needs eager mode). ONNX and runtimes without
    nat_mm get its gather form (`export.py`).

    Args:
        q, k, v: [B, H, W, heads, head_dim], same dtype and device.
        kernel_size: Odd K >= 3, or (Kh, Kw).
        dilation: d >= 1, or (dh, dw). Needs H >= Kh * dh and W >= Kw * dw.
        rpb: Relative positional bias [heads, 2Kh-1, 2Kw-1], or None.
        scale: Logit scale; default head_dim ** -0.5.
        backend: None picks the best capable backend (see `set_default_backend`, `use_backend`);
            one of 'natten', 'flex', 'cpu' or 'torch' (`nat_mm.ops.backends.backend_names()`)
            forces it and raises if it cannot run.

    Returns:
        [B, H, W, heads, head_dim], dtype of q.

    Raises:
        TypeError, ValueError: Bad inputs (the message names the argument).
        RuntimeError: A forced backend cannot run these inputs (the message says why).
    """
    kernel, dil = _check_inputs(q, k, v, kernel_size, dilation, rpb)
    scale = _check_scale(scale, q.shape[-1])
    forced = backend if backend is not None else _default_backend
    if forced is not None:
        _check_backend_name(forced, 'backend')
    if capturing_graph(q):
        # One operator in the graph; the backend is chosen when the graph runs (library.py).
        return torch.ops.nat_mm.na2d(q, k, v, rpb, list(kernel), list(dil), scale, forced)
    return dispatch(q, k, v, kernel, dil, rpb, scale, forced)


def capturing_graph(q: torch.Tensor) -> bool:
    """Whether na2d is being captured into a graph rather than run: torch.compile, torch.export,
    make_fx / FakeTensor tracing. There na2d is the operator `torch.ops.nat_mm.na2d`.

    `torch.jit.trace` is not among them: it records the autograd Function of `traced.py`, whose
    node the FLOP counting of `flops.py` reads.
    """
    if torch.compiler.is_compiling():  # dynamo (compile, strict export) and non-strict export
        return True
    return isinstance(q, FakeTensor) or _get_current_dispatch_mode() is not None


def dispatch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: tuple[int, int],
    dil: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
    forced: str | None,
) -> torch.Tensor:
    """Run validated inputs on backend `forced`, or on the automatic choice with its fallback
    (see `na2d`). Eager calls and the kernel of `torch.ops.nat_mm.na2d` both come here."""
    global _last_backend
    configuration = _configuration(q, k, v, rpb)
    if forced is not None:
        reason = check_backend(forced, q, k, v, kernel, dil, rpb)
        if reason is not None:
            raise RuntimeError(f'na2d backend {forced!r} cannot run these inputs: {reason}')
        names, skipped = [forced], {}
    else:
        names, skipped = _automatic_candidates(q, k, v, kernel, dil, rpb, configuration)
    if q.numel() == 0:
        _last_backend = names[0]
        return _empty_output(q, k, v, rpb)
    for position, name in enumerate(names[:-1]):
        try:
            out = _run(name, q, k, v, kernel, dil, rpb, scale)
        except Exception as error:
            if not _is_compile_error(error):
                raise
            skipped[name] = _remember_failure(name, names[position + 1], configuration, error)
            continue
        _chosen(name, q, skipped)
        return out
    # The last capable backend, or the forced one: its errors propagate.
    out = _run(names[-1], q, k, v, kernel, dil, rpb, scale)
    if forced is None:
        _chosen(names[-1], q, skipped)
    else:
        _last_backend = forced
    return out


def _run(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: tuple[int, int],
    dil: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    if torch.jit.is_tracing():
        return TracedNeighborhoodAttention2D.apply(q, k, v, rpb, kernel, dil, scale, name)
    return BACKENDS[name].forward(q, k, v, kernel, dil, rpb, scale)


def _automatic_candidates(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: tuple[int, int],
    dil: tuple[int, int],
    rpb: torch.Tensor | None,
    configuration: tuple[object, ...],
) -> tuple[list[str], dict[str, str]]:
    """Capable backends minus those that failed before for this configuration, best first."""
    capable, skipped = capable_backends(q, k, v, kernel, dil, rpb)
    names = []
    for name in capable:
        reason = _failed.get((name, *configuration))
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    if not names:
        raise RuntimeError(f'No neighborhood-attention backend can run these inputs: {skipped}')
    return names, skipped


def _configuration(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None
) -> tuple[object, ...]:
    """What a backend's failure is remembered for: what decides which kernel it compiles."""
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    return q.device.type, q.dtype, q.shape[-1], rpb is not None, needs_grad


def _is_compile_error(error: Exception) -> bool:
    """Whether `error` is one of `_COMPILE_ERRORS`: a failure to fall back on."""
    # Looked up among loaded modules only: an error class is loaded if it was raised, and a CPU
    # run must not import inductor or triton just to rule them out.
    classes = tuple(
        error_class
        for module, name in _COMPILE_ERRORS
        if isinstance(error_class := getattr(sys.modules.get(module), name, None), type)
    )
    return isinstance(error, classes)


def _remember_failure(
    name: str, next_name: str, configuration: tuple[object, ...], error: Exception
) -> str:
    """Record that backend `name` raised for this configuration, log it; return the reason."""
    lines = str(error).strip().splitlines()
    error_text = f'{type(error).__name__}: {lines[0][:300] if lines else ""}'
    reason = _failed[(name, *configuration)] = f'raised {error_text}'
    device, dtype, head_dim, has_rpb, needs_grad = configuration
    print_log(
        f'na2d: backend {name!r} raised on {device} ({dtype}, head_dim={head_dim}, '
        f'rpb={has_rpb}, grad={needs_grad}): {error_text}; using {next_name!r} for this '
        'configuration from now on',
        logger='current',
        level=logging.WARNING,
    )
    return reason


def _empty_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None
) -> torch.Tensor:
    """The (empty) output of empty inputs, inside the autograd graph of q, k, v and rpb."""
    out = (q + k + v) * 0
    if rpb is not None:
        out = out + rpb.to(q.dtype).sum() * 0
    return out


def available_backends() -> list[str]:
    """Backends that can run in this environment (for some inputs), in priority order."""
    return [name for name in backend_names() if BACKENDS[name].unavailable_reason() is None]


def last_backend() -> str | None:
    """Name of the backend used by the most recent `na2d` call (None before the first)."""
    return _last_backend


def set_default_backend(name: str | None) -> None:
    """Force backend `name` for every later `na2d` call without `backend=`; None = automatic."""
    global _default_backend
    if name is not None:
        _check_backend_name(name, 'name')
    _default_backend = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: `set_default_backend(name)` inside the block, restored on exit."""
    previous = _default_backend
    set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(previous)


def _check_backend_name(name: object, argument: str) -> None:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f'{argument} must be one of {backend_names()} or None, got {name!r}')


def _chosen(name: str, q: torch.Tensor, skipped: dict[str, str]) -> None:
    """Record the automatic choice `name` as the last backend; log it once per situation."""
    global _last_backend
    _last_backend = name
    key = (name, q.device.type, tuple(sorted(skipped.items())))
    if key in _logged_choices:
        return
    _logged_choices.add(key)
    why = '; '.join(f'{other}: {reason}' for other, reason in skipped.items())
    message = f'na2d: using backend {name!r} on {q.device.type}'
    print_log(message + (f' (skipped {why})' if why else ''), logger='current', level=logging.INFO)


def _pair(value: object, argument: str) -> tuple[int, int]:
    """int or (int, int) -> (int, int); TypeError naming `argument` otherwise."""
    values = (value, value) if isinstance(value, numbers.Integral) else value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != 2
        or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in values)
        or isinstance(value, bool)
    ):
        raise TypeError(f'{argument} must be an int or a pair of ints, got {value!r}')
    return int(values[0]), int(values[1])


def _check_inputs(
    q: object,
    k: object,
    v: object,
    kernel_size: object,
    dilation: object,
    rpb: object,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate na2d's inputs; return normalized (kernel_size, dilation)."""
    for argument, tensor in (('q', q), ('k', k), ('v', v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'{argument} must be a torch.Tensor, got {type(tensor).__name__}')
        if tensor.dim() != 5:
            raise ValueError(
                f'{argument} must be 5-D [B, H, W, heads, head_dim], '
                f'got shape {tuple(tensor.shape)}'
            )
    if not q.is_floating_point():
        raise TypeError(f'q must have a floating-point dtype, got {q.dtype}')
    for argument, tensor in (('k', k), ('v', v)):
        if tensor.shape != q.shape:
            raise ValueError(
                f'{argument} must have the shape of q {tuple(q.shape)}, got {tuple(tensor.shape)}'
            )
        if tensor.dtype != q.dtype:
            raise TypeError(f'{argument} must have the dtype of q ({q.dtype}), got {tensor.dtype}')
        if tensor.device != q.device:
            raise ValueError(
                f'{argument} must be on the device of q ({q.device}), got {tensor.device}'
            )
    kernel = _pair(kernel_size, 'kernel_size')
    if any(size < 3 or size % 2 == 0 for size in kernel):
        raise ValueError(f'kernel_size must be odd and >= 3, got {kernel_size!r}')
    dil = _pair(dilation, 'dilation')
    if any(d < 1 for d in dil):
        raise ValueError(f'dilation must be >= 1, got {dilation!r}')
    _, height, width, heads, _ = q.shape
    for axis, length, size, d in (
        ('H', height, kernel[0], dil[0]),
        ('W', width, kernel[1], dil[1]),
    ):
        if length < size * d:
            raise ValueError(
                f'{axis}={length} must be >= kernel_size * dilation = {size} * {d} = {size * d} '
                f'(q shape {tuple(q.shape)}); pad the map first'
            )
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f'rpb must be a torch.Tensor or None, got {type(rpb).__name__}')
        expected = (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(
                f'rpb must have shape [heads, 2*Kh-1, 2*Kw-1] = {list(expected)}, '
                f'got {list(rpb.shape)}'
            )
        if not rpb.is_floating_point():
            raise TypeError(f'rpb must have a floating-point dtype, got {rpb.dtype}')
        if rpb.device != q.device:
            raise ValueError(f'rpb must be on the device of q ({q.device}), got {rpb.device}')
    return kernel, dil


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f'scale must be a real number or None, got {scale!r}')
    return float(scale)
