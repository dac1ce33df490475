"""Exact 2-D (dilated) neighborhood attention: `na2d` and its backend controls.

Importing this package registers the operator `torch.ops.nat_mm.na2d` (`library.py`), which is
what graphs capture of na2d (torch.compile, torch.export, ONNX through `export.py`), and a
two-stage detector's `nms` / `roi_align` (`detection.py`, for its export).
"""

from . import detection, library  # noqa: F401  (register torch.ops.nat_mm.na2d / nms / roi_align)
from .functional import available_backends, last_backend, na2d, set_default_backend, use_backend

__all__ = ['available_backends', 'last_backend', 'na2d', 'set_default_backend', 'use_backend']
