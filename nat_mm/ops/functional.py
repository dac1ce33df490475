"""`na2d`: exact 2-D (dilated) neighborhood attention with pluggable backends.

Semantics: NATTEN 0.14 (`/work/shared/design/neighborhood-attention.md`, sections 1-2):
windows shift inward at borders, dilation = independent sub-lattices, RPB index
`(key - query) // d + K - 1`.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Iterator

import torch
from mmengine.logging import print_log

from .backends import BACKENDS, backend_names, check_backend, choose_backend
from .traced import NeighborhoodAttention2D

_default_backend: str | None = None
_last_backend: str | None = None
_logged_choices: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()


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
    window, and the weights average v. The caller pads maps smaller than `kernel_size * dilation`.

    Args:
        q, k, v: [B, H, W, heads, head_dim], same dtype and device.
        kernel_size: Odd K >= 3, or (Kh, Kw).
        dilation: d >= 1, or (dh, dw). Needs H >= Kh * dh and W >= Kw * dw.
        rpb: Relative positional bias [heads, 2Kh-1, 2Kw-1], or None.
        scale: Logit scale; default head_dim ** -0.5.
        backend: None picks the best capable backend (see `set_default_backend`, `use_backend`);
            'torch', 'flex' or 'natten' forces one and raises if it cannot run.

    Returns:
        [B, H, W, heads, head_dim], dtype of q.

    Raises:
        TypeError, ValueError: Bad inputs (the message names the argument).
        RuntimeError: A forced backend cannot run these inputs (the message says why).
    """
    global _last_backend
    kernel, dil = _check_inputs(q, k, v, kernel_size, dilation, rpb)
    scale = _check_scale(scale, q.shape[-1])
    name = backend if backend is not None else _default_backend
    if name is None:
        name, skipped = choose_backend(q, k, v, kernel, dil, rpb)
        _log_choice(name, q, skipped)
    else:
        _check_backend_name(name, 'backend')
        reason = check_backend(name, q, k, v, kernel, dil, rpb)
        if reason is not None:
            raise RuntimeError(f'na2d backend {name!r} cannot run these inputs: {reason}')
    _last_backend = name
    if torch.jit.is_tracing():
        return NeighborhoodAttention2D.apply(q, k, v, rpb, kernel, dil, scale, name)
    return BACKENDS[name].forward(q, k, v, kernel, dil, rpb, scale)


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


def _log_choice(name: str, q: torch.Tensor, skipped: dict[str, str]) -> None:
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
