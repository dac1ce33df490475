"""FLOP counting of na2d through mmengine's get_model_complexity_info."""

from __future__ import annotations

import pytest
import torch
from mmengine.analysis import complexity_analysis, get_model_complexity_info

from nat_mm.ops import na2d, use_backend
from nat_mm.ops.flops import OP_NAME, na2d_flop_count, register_flop_handles


class OneNA(torch.nn.Module):
    def __init__(self, with_rpb: bool) -> None:
        super().__init__()
        self.rpb = torch.nn.Parameter(torch.zeros(2, 5, 9)) if with_rpb else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return na2d(x, x, x, (3, 5), 2, rpb=self.rpb)


def test_register_is_idempotent() -> None:
    register_flop_handles()
    handle = complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[OP_NAME]
    register_flop_handles()
    assert complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[OP_NAME] is handle


@pytest.mark.parametrize('with_rpb', [False, True])
def test_one_na2d_counts_qk_plus_av(with_rpb: bool) -> None:
    register_flop_handles()
    batch, height, width, heads, head_dim = 2, 8, 12, 2, 4
    x = torch.randn(batch, height, width, heads, head_dim)
    info = get_model_complexity_info(
        OneNA(with_rpb), inputs=(x,), show_table=False, show_arch=False
    )
    # q.k and attn.v: B * heads * H * W * (Kh * Kw) * head_dim MACs each.
    expected = 2 * batch * heads * height * width * (3 * 5) * head_dim
    assert info['flops'] == expected
    assert na2d_flop_count((batch, height, width, heads, head_dim), (3, 5)) == expected


def test_traced_output_matches_eager() -> None:
    x = torch.randn(1, 8, 12, 2, 4)
    model = OneNA(with_rpb=True)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), model(x))
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert 'prim::PythonOp' in kinds


def test_traced_gradients_match_eager() -> None:
    x = torch.randn(1, 8, 12, 2, 4)
    model = OneNA(with_rpb=True)
    torch.nn.init.normal_(model.rpb)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    x_eager, x_traced = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(x_eager).square().sum().backward()
    rpb_grad = model.rpb.grad.clone()
    model.rpb.grad = None
    traced(x_traced).square().sum().backward()
    torch.testing.assert_close(x_traced.grad, x_eager.grad)
    torch.testing.assert_close(model.rpb.grad, rpb_grad)


def test_traced_double_backward_matches_eager() -> None:
    """create_graph=True through the traced node (torch backend): second derivatives flow."""
    x = torch.randn(1, 8, 12, 2, 4, dtype=torch.float64)
    model = OneNA(with_rpb=True).double()
    torch.nn.init.normal_(model.rpb)
    with use_backend('torch'):
        traced = torch.jit.trace(model, (x,), check_trace=False)
        results = []
        for function in (model, traced):
            inputs = x.clone().requires_grad_()
            (grad,) = torch.autograd.grad(function(inputs).sin().sum(), inputs, create_graph=True)
            results.append(torch.autograd.grad(grad.square().sum(), (inputs, model.rpb)))
    for traced_grad, eager_grad in zip(results[1], results[0], strict=True):
        assert traced_grad.abs().sum() > 0
        torch.testing.assert_close(traced_grad, eager_grad)


def test_op_name_follows_the_traced_function() -> None:
    assert OP_NAME == 'prim::PythonOp.TracedNeighborhoodAttention2D'
    x = torch.randn(1, 8, 12, 2, 4)
    traced = torch.jit.trace(OneNA(with_rpb=False), (x,), check_trace=False)
    names = [
        node.pyname() for node in traced.inlined_graph.nodes() if node.kind() == 'prim::PythonOp'
    ]
    assert names == ['TracedNeighborhoodAttention2D']
