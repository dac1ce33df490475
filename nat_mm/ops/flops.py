"""FLOP (MAC) counting of na2d for mmengine's `get_model_complexity_info`.

While `torch.jit.trace` runs, `na2d` goes through the autograd Function
`TracedNeighborhoodAttention2D` (`traced.py`), one node named `OP_NAME` in mmengine's jit
analysis. Its handle counts what NATTEN's fvcore handles counted (published NAT/DiNAT numbers are
fvcore MACs, docs/neighborhood-attention.md section 5): `B * heads * H * W * Kh * Kw * head_dim`
for q.k plus the same for attn.v; the softmax and the RPB add are not counted.
"""

from __future__ import annotations

from typing import Any

from .traced import TracedNeighborhoodAttention2D

OP_NAME = f'prim::PythonOp.{TracedNeighborhoodAttention2D.__name__}'


def na2d_flop_count(query_shape: tuple[int, ...], kernel_size: tuple[int, int] | int) -> int:
    """MACs of one na2d call.

    Args:
        query_shape: [B, H, W, heads, head_dim].
        kernel_size: K or (Kh, Kw).

    Returns:
        2 * B * heads * H * W * Kh * Kw * head_dim.
    """
    kernel_h, kernel_w = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    batch, height, width, heads, head_dim = query_shape
    return 2 * batch * heads * height * width * kernel_h * kernel_w * head_dim


def na2d_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """mmengine/fvcore jit handle for `OP_NAME`, the traced na2d.

    Args:
        inputs: The node's input values (q, k, v, [rpb]).
        outputs: The node's output values.

    Returns:
        MACs, see `na2d_flop_count`.
    """
    query_shape = tuple(inputs[0].type().sizes())
    return na2d_flop_count(query_shape, _traced_kernel_size(outputs[0]))


def register_flop_handles() -> None:
    """Add na2d's handles to mmengine's default FLOP and activation handles (idempotent).

    Activations are counted like a matmul's: the output's elements.
    """
    from mmengine.analysis import complexity_analysis
    from mmengine.analysis.jit_handles import generic_activation_jit

    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[OP_NAME] = na2d_flop_jit
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS[OP_NAME] = generic_activation_jit()


def _traced_kernel_size(output: Any) -> tuple[int, int]:
    """Kernel size from the scalar arguments of the PythonOp node producing `output`.

    Handles only see input and output values; the node's non-tensor arguments (kernel_size,
    dilation, backend) are on the node itself.
    """
    # Scalar arguments in call order: [rpb if it is None], kernel_size, dilation, backend.
    kernel_size = next(arg for arg in output.node().scalar_args() if arg is not None)
    return int(kernel_size[0]), int(kernel_size[1])
