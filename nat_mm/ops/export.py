"""Exported na2d without nat_mm's kernels: the portable ExportedProgram and ONNX.

`torch.export` keeps na2d as the operator `nat_mm::na2d` (`library.py`): such a program runs its
nat_mm kernels (any backend, any device), and loading it needs `import nat_mm`. For a runtime
without nat_mm, `portable_program` replaces every na2d by its gather form (`gather.py`: standard
operators only), and `to_onnx` lowers that to ONNX, which stock onnxruntime runs. This route
(a decomposition the ONNX exporter lowers, not a custom ONNX translation) keeps one window rule
for every backend and the ONNX graph; the sizes stay symbolic, so a program exported with
dynamic H and W gives an ONNX file with dynamic H and W.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from nat_mm.errors import NatMMError

from .gather import na2d_gather

# What `torch.onnx.export(dynamo=True)` needs beyond torch (the `export` extra of pyproject.toml).
ONNX_PACKAGES = ('onnx', 'onnxscript')


def _na2d_decomposition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: list[int],
    dilation: list[int],
    scale: float,
    backend: str | None,
) -> torch.Tensor:
    # The backend names a kernel; the gather form is the same function without one.
    return na2d_gather(q, k, v, rpb, kernel_size, dilation, scale)


def na2d_decompositions() -> dict:
    """`{torch.ops.nat_mm.na2d.default: gather form}` for `ExportedProgram.run_decompositions`."""
    return {torch.ops.nat_mm.na2d.default: _na2d_decomposition}


def portable_program(
    program: torch.export.ExportedProgram,
) -> torch.export.ExportedProgram:
    """`program` with every `nat_mm::na2d` replaced by its gather form (standard aten ops).

    The result loads and runs without nat_mm, and is what `to_onnx` lowers. Other operators are
    left as they are (no other decomposition runs).
    """
    return program.run_decompositions(na2d_decompositions())


def missing_onnx_packages() -> list[str]:
    """The packages `to_onnx` needs that are not installed (empty when it can run)."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def to_onnx(
    program: torch.export.ExportedProgram,
    path: str | os.PathLike | None = None,
    opset_version: int | None = None,
) -> torch.onnx.ONNXProgram:
    """Lower an exported program (na2d included) to ONNX made of standard operators.

    Args:
        program: From `torch.export.export`; symbolic input sizes stay symbolic in the ONNX graph.
        path: Where to save the .onnx file (None: only return the program).
        opset_version: ONNX opset; None for the exporter's default.

    Returns:
        The `torch.onnx.ONNXProgram` (its `model_proto` is the ONNX model).

    Raises:
        NatMMError: onnx / onnxscript are missing (`pip install 'nat_mm[export]'`).
    """
    missing = missing_onnx_packages()
    if missing:
        raise NatMMError(
            f'ONNX export needs {missing}, which are not installed: '
            "pip install 'nat_mm[export]' (onnx, onnxscript and onnxruntime)",
            'onnx',
        )
    from .detection import onnx_translations

    # nat_mm::nms / nat_mm::roi_align (a two-stage detector) become standard ONNX operators.
    onnx_program = torch.onnx.export(
        portable_program(program),
        dynamo=True,
        opset_version=opset_version,
        custom_translation_table=onnx_translations(),
        verbose=False,
    )
    if path is not None:
        onnx_program.save(os.fspath(path))
    return onnx_program
