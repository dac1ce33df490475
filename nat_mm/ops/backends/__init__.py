"""Neighborhood-attention backends: one module each, one signature, one dispatcher.

Every backend module has `NAME`, `unavailable_reason() -> str | None` (can it run at all in this
environment), `can_run(q, k, v, kernel_size, dilation, rpb) -> str | None` (None = OK, else the
reason) and `forward(q, k, v, kernel_size, dilation, rpb, scale) -> Tensor`, all on validated,
normalized inputs (see `nat_mm/ops/functional.py`). Modelled on NATTEN's
`src/natten/backends/__init__.py`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import cpu_na, flex_na, natten_na, torch_na

BACKENDS: dict[str, ModuleType] = {
    module.NAME: module for module in (natten_na, flex_na, cpu_na, torch_na)
}

# Automatic choice, best first. On CUDA NATTEN's fused kernels (no RPB) beat Flex, which beats the
# tiled torch path. On CPU the compiled kernel (float32 / float64) beats the tiled torch path;
# NATTEN and Flex are forward-only or slower there (they can still be forced).
AUTO_PRIORITY: dict[str, tuple[str, ...]] = {
    'cuda': ('natten', 'flex', 'torch'),
    'cpu': ('cpu', 'torch'),
}
FALLBACK_PRIORITY: tuple[str, ...] = ('torch',)


def backend_names() -> tuple[str, ...]:
    """Names of all known backends."""
    return tuple(BACKENDS)


def check_backend(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> str | None:
    """Why backend `name` cannot run these inputs, or None if it can."""
    module = BACKENDS[name]
    reason = module.unavailable_reason()
    if reason is None:
        reason = module.can_run(q, k, v, kernel_size, dilation, rpb)
    return reason


def choose_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> tuple[str, dict[str, str]]:
    """Pick the best capable backend for these inputs.

    Returns:
        The chosen name and, for every better backend that was skipped, the reason.

    Raises:
        RuntimeError: If no backend can run (never for validated inputs: torch runs everything).
    """
    skipped: dict[str, str] = {}
    for name in AUTO_PRIORITY.get(q.device.type, FALLBACK_PRIORITY):
        reason = check_backend(name, q, k, v, kernel_size, dilation, rpb)
        if reason is None:
            return name, skipped
        skipped[name] = reason
    raise RuntimeError(f'No neighborhood-attention backend can run these inputs: {skipped}')
