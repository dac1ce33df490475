"""NATTEN backend: `natten.na2d` (NATTEN >= 0.20, heads-last), for layers without RPB.

NATTEN >= 0.20 dropped RPB and its CPU path is FlexAttention without backward (forward only);
its fused CUDA kernels need `natten.HAS_LIBNATTEN` (docs/neighborhood-attention.md section 4).
Windows, borders and dilation follow the same rules as NATTEN 0.14 (section 1), so the results
match the other backends.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

NAME = 'natten'
MIN_VERSION = (0, 20)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _natten() -> ModuleType | None:
    try:
        import natten
    except ImportError:
        return None
    return natten


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split('+')[0].split('.')[:2] if part.isdigit())


def unavailable_reason() -> str | None:
    """Why NATTEN cannot be used at all here, or None."""
    natten = _natten()
    if natten is None:
        return 'NATTEN is not installed (pip install natten)'
    version = getattr(natten, '__version__', '0.0')
    if _version(version) < MIN_VERSION:
        return f'needs NATTEN >= {".".join(map(str, MIN_VERSION))}, found {version}'
    return None


def can_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> str | None:
    """Why `natten.na2d` cannot compute these inputs, or None."""
    if rpb is not None:
        return 'NATTEN >= 0.20 has no relative positional bias: rpb must be None'
    if q.dtype not in DTYPES:
        return f'NATTEN supports dtypes {DTYPES}, got {q.dtype}'
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type == 'cpu' and needs_grad:
        return 'NATTEN on CPU (its Flex backend) is forward-only; inputs require grad'
    if q.device.type == 'cuda':
        if not _natten().HAS_LIBNATTEN:
            return 'NATTEN was installed without its CUDA kernels (natten.HAS_LIBNATTEN is False)'
        if q.shape[-1] % 8 != 0:
            return f'NATTEN fused kernels need head_dim % 8 == 0, got head_dim={q.shape[-1]}'
    elif q.device.type != 'cpu':
        return f'NATTEN runs on cuda or cpu, got device {q.device}'
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """`natten.na2d` on [B, H, W, heads, head_dim] (rpb must be None, see `can_run`)."""
    return _natten().na2d(q, k, v, kernel_size, dilation=dilation, scale=scale)
