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

# Automatic choice, best first (README.md's backend table). On CUDA NATTEN's fused kernels (no RPB,
# docs/neighborhood-attention.md section 4) beat Flex, which beats the tiled torch path. On CPU the
# compiled kernel (float32 / float64 / bfloat16 / float16) beats the tiled torch path; NATTEN and
# Flex are forward-only or slower there (they can still be forced). A backend whose forward
# fails to compile is skipped (`nat_mm.ops.na2d`).
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


def capable_backends(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> tuple[list[str], dict[str, str]]:
    """The backends of the automatic choice that can run these inputs, best first.

    Returns:
        The capable names in priority order (never empty for validated inputs: torch runs
        everything) and, for every other backend of the device's priority list, the reason.
    """
    capable: list[str] = []
    skipped: dict[str, str] = {}
    for name in AUTO_PRIORITY.get(q.device.type, FALLBACK_PRIORITY):
        reason = check_backend(name, q, k, v, kernel_size, dilation, rpb)
        if reason is None:
            capable.append(name)
        else:
            skipped[name] = reason
    return capable, skipped
