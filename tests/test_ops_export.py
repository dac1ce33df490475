"""na2d as one operator (`torch.ops.nat_mm.na2d`): opcheck, gradients, torch.compile, torch.export,
the portable gather form and ONNX run in onnxruntime.

The compile tests use `backend='aot_eager'` (dynamo and AOT autograd, no code generation: 2 CPU
cores); inductor is in the slow tests. Static-size exports stay in the default suite; the
dynamic-shape ONNX export (symbolic shapes cost about a minute here) is slow.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from nat_mm.apis.export import build_network, export_and_check
from nat_mm.errors import NatMMError
from nat_mm.models import NAT, DiNAT
from nat_mm.ops import export, na2d
from nat_mm.ops.backends.windows import axis_window
from nat_mm.ops.gather import na2d_gather, window_keys
from nat_mm.ops.reference import na2d_reference, random_inputs, window_indices

OP = torch.ops.nat_mm.na2d.default
CPU_KERNEL = pytest.param('cpu', marks=pytest.mark.requires_cpu_kernel)
# (shape [B, H, W, heads, D], kernel_size, dilation, with_rpb): borders, dilation with uneven
# sub-lattices (13 % 2, 17 % 3), per-axis settings, no RPB.
OP_CASES = [
    ((2, 13, 17, 2, 8), (3, 5), (2, 3), True),
    ((1, 9, 9, 1, 4), (3, 3), (1, 1), False),
    ((1, 16, 14, 3, 8), (7, 7), (2, 2), True),
]
# A size that is odd, non-square and smaller than K * d at every stage of SMALL_DINAT (so that
# every layer pads), and a second size that pads at fewer stages.
SIZE, OTHER_SIZE = (61, 75), (96, 64)


def small_backbone(cls: type, **options) -> NAT:
    """NAT / DiNAT shrunk to one block per stage (embed_dim 16), eval mode, seeded weights."""
    torch.manual_seed(0)
    if cls is DiNAT:
        options.setdefault('dilations', [[3], [2], [1], [1]])
    model = cls(
        arch=None, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], mlp_ratio=2.0,
        **options,
    )  # fmt: skip
    for module in model.modules():  # non-zero RPB tables: the bias must reach the outputs
        if getattr(module, 'rpb', None) is not None:
            torch.nn.init.normal_(module.rpb, std=0.5)
    return model.eval()


def na2d_nodes(graph: torch.fx.Graph) -> int:
    return sum(1 for node in graph.nodes if 'nat_mm.na2d' in str(node.target))


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the error itself for a zero tensor)."""
    error, scale = (actual - expected).abs().max(), expected.abs().max()
    return float(error / scale) if scale > 0 else float(error)


# --- the window rule and the gather form ---------------------------------------------------------


def test_windows_follow_the_documented_rule() -> None:
    """The one rule of backends/windows.py (and the gather form's tables) equals the oracle's."""
    for length in range(3, 40):
        for kernel_size in (3, 5, 7):
            for dilation in range(1, 6):
                if length < kernel_size * dilation:
                    continue
                keys, bias = window_indices(length, kernel_size, dilation)
                first_key, first_bias = axis_window(length, kernel_size, dilation)
                assert torch.equal(first_key, keys[:, 0]) and torch.equal(first_bias, bias[:, 0])
                gathered = window_keys(length, kernel_size, dilation, torch.device('cpu'))
                assert torch.equal(gathered[0], keys) and torch.equal(gathered[1], bias)


@pytest.mark.parametrize('case', OP_CASES)
def test_gather_form_matches_the_oracle(case) -> None:
    shape, kernel_size, dilation, with_rpb = case
    q, k, v, rpb = random_inputs(shape, kernel_size, with_rpb, torch.float64)
    out = na2d_gather(q, k, v, rpb, list(kernel_size), list(dilation), 0.3)
    expected = na2d_reference(q, k, v, kernel_size, dilation, rpb, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous()


# --- the operator ---------------------------------------------------------------------------------


@pytest.mark.parametrize('backend', [None, 'torch'])
@pytest.mark.parametrize('case', OP_CASES)
def test_opcheck(case, backend: str | None) -> None:
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch with dynamic
    shapes, for na2d and for its backward operator."""
    shape, kernel_size, dilation, with_rpb = case
    q, k, v, rpb = random_inputs(shape, kernel_size, with_rpb)
    options = (list(kernel_size), list(dilation), 0.3, backend)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    if rpb is not None:
        rpb.requires_grad_()
    torch.library.opcheck(OP, (q, k, v, rpb, *options))
    grad_out = torch.randn(shape)
    tensors = [x.detach() if x is not None else None for x in (q, k, v, rpb)]
    backward = (grad_out, *tensors, *options, with_rpb)
    torch.library.opcheck(torch.ops.nat_mm.na2d_backward.default, backward)


@pytest.mark.parametrize('backend', ['torch', CPU_KERNEL, None])
@pytest.mark.parametrize('case', OP_CASES)
def test_operator_gradients_equal_the_backends(case, backend: str | None) -> None:
    """Through the operator (its backward operator) a backend gives its own eager results, bit
    for bit, and those are the oracle's."""
    shape, kernel_size, dilation, with_rpb = case
    inputs = random_inputs(shape, kernel_size, with_rpb, torch.float64)
    grad_out = torch.randn(shape, dtype=torch.float64)
    results = []
    for through_op in (True, False):
        leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs]
        q, k, v, rpb = leaves
        if through_op:
            out = OP(q, k, v, rpb, list(kernel_size), list(dilation), 0.3, backend)
        else:
            out = na2d(q, k, v, kernel_size, dilation, rpb, 0.3, backend=backend)
        wanted = [x for x in leaves if x is not None]
        results.append((out, *torch.autograd.grad(out, wanted, grad_out)))
    for through_op, eager in zip(*results, strict=True):
        torch.testing.assert_close(through_op, eager, rtol=0, atol=0)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs]
    expected = na2d_reference(*leaves[:3], kernel_size, dilation, leaves[3], 0.3)
    wanted = [x for x in leaves if x is not None]
    oracle = (expected, *torch.autograd.grad(expected, wanted, grad_out))
    for got, want in zip(results[0], oracle, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_operator_with_one_tensor_as_q_k_v_and_an_empty_batch() -> None:
    x = torch.randn(1, 7, 9, 2, 4, dtype=torch.float64, requires_grad=True)
    (through_op,) = torch.autograd.grad(OP(x, x, x, None, [3, 3], [1, 2], 0.5, None).sum(), x)
    (eager,) = torch.autograd.grad(na2d(x, x, x, 3, (1, 2), None, 0.5).sum(), x)
    torch.testing.assert_close(through_op, eager, rtol=0, atol=0)
    empty = torch.zeros(0, 7, 7, 1, 4, requires_grad=True)
    rpb = torch.ones(1, 5, 5, requires_grad=True)
    out = OP(empty, empty, empty, rpb, [3, 3], [1, 1], 0.5, None)
    grad_x, grad_rpb = torch.autograd.grad(out.sum(), (empty, rpb))
    assert out.shape == empty.shape and grad_x.shape == empty.shape
    assert torch.equal(grad_rpb, torch.zeros_like(rpb))


def test_a_forced_backend_that_cannot_run_raises_in_the_kernel() -> None:
    """The backend is checked where the graph runs (NATTEN takes no RPB; or is not installed)."""
    q, k, v, rpb = random_inputs((1, 9, 9, 1, 4), (3, 3), with_rpb=True)
    with pytest.raises(RuntimeError, match="na2d backend 'natten' cannot run these inputs"):
        OP(q, k, v, rpb, [3, 3], [1, 1], 0.5, 'natten')


# --- torch.compile -----------------------------------------------------------------------------


def compile_dynamic(model: NAT, backend: str) -> tuple[CompileCounterWithBackend, torch.nn.Module]:
    """torch.compile with dynamic shapes and fullgraph=True (no graph break anywhere, na2d
    included), counting its compiles."""
    # Compiled code stays attached to the code objects (NAT.forward, ...) across tests: start
    # from none, so that the other tests' compiles do not count towards the recompile limit.
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return counter, torch.compile(model, backend=counter, dynamic=True, fullgraph=True)


def assert_matches_eager(
    compiled: torch.nn.Module, model: NAT, size: tuple[int, int], tolerance: float = 1e-5
) -> None:
    """Outputs, and in training every parameter's gradient, equal eager's to `tolerance` (max
    error relative to the tensor's largest value: fp32 sums in another order, compiled graphs
    convolve contiguous copies)."""
    image = torch.randn(2, 3, *size)
    results = []
    for function in (compiled, model):
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws
        with torch.set_grad_enabled(model.training):
            outputs = function(image)
            if model.training:
                torch.manual_seed(2)
                sum((out * torch.randn_like(out)).sum() for out in outputs).backward()
        results.append(
            [*outputs, *(p.grad.clone() for p in model.parameters() if p.grad is not None)]
        )
    assert len(results[0]) == len(results[1])
    for compiled_value, eager_value in zip(*results, strict=True):
        assert max_relative_error(compiled_value, eager_value) <= tolerance


def compile_and_compare(
    model: NAT, mode: str, backend: str = 'aot_eager', tolerance: float = 1e-5, recompiles: int = 0
) -> None:
    """Compiled equals eager in `mode` at SIZE and at OTHER_SIZE, which recompiles `recompiles`
    times (none but where torch itself guards on a size)."""
    getattr(model, mode)()
    counter, compiled = compile_dynamic(model, backend)
    assert_matches_eager(compiled, model, SIZE, tolerance)
    frames = counter.frame_count
    assert_matches_eager(compiled, model, OTHER_SIZE, tolerance)
    assert counter.frame_count == frames + recompiles, 'the second size compiled anew'
    assert na2d_nodes(counter.graphs[-1].graph) == len(model.stages)


def test_compiled_dinat_trains_like_eager_without_recompiles() -> None:
    """Training with drop path and dilations: outputs and every parameter's gradient equal
    eager's; neither a second size nor new drop-path rates recompile (no block's rate is a guard
    on its value)."""
    # Two stages (a dilation of 3, then 2) keep the compile within the default suite's time.
    model = small_backbone(DiNAT, drop_path_rate=0.3, out_indices=(0, 1)).train()
    counter, compiled = compile_dynamic(model, 'aot_eager')
    assert_matches_eager(compiled, model, SIZE)
    frames = counter.frame_count
    assert_matches_eager(compiled, model, OTHER_SIZE)
    for block in model.modules():
        if hasattr(block, 'drop_prob'):
            block.drop_prob = 0.5
    assert_matches_eager(compiled, model, OTHER_SIZE)
    assert counter.frame_count == frames, 'a second size or new drop-path rates recompiled'
    assert na2d_nodes(counter.graphs[-1].graph) == 2


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('cls', [NAT, DiNAT])
def test_compiled_backbones_match_eager(cls: type, mode: str) -> None:
    compile_and_compare(small_backbone(cls, drop_path_rate=0.2), mode)


def test_compiled_nat_eval_matches_eager() -> None:
    compile_and_compare(small_backbone(NAT, out_indices=(0, 1)), 'eval')


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_inductor_keeps_the_operator_and_matches_eager(mode: str) -> None:
    # No drop path: inductor draws its own random numbers.
    # Inductor's fused kernels sum in their own order: gradients differ by up to 4e-5 here.
    model = small_backbone(DiNAT, drop_path_rate=0.0, out_indices=(0, 1))
    # Without the on-disk caches: an entry that an earlier process compiled brings its own
    # guards on the input size (torch 2.13's AOT autograd cache), one recompile at the next size.
    # In training, inductor's backward compile re-strides a saved activation with the strides it
    # chose for the real tensor (torch/_functorch/_aot_autograd/graph_compile.py), which guards
    # on the width of stage 2: one recompile at the second size, from torch, not from nat_mm
    # (aot_eager, the same graph without inductor, does not recompile).
    recompiles = 1 if mode == 'train' else 0
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        compile_and_compare(model, mode, 'inductor', tolerance=1e-4, recompiles=recompiles)


# --- torch.export and ONNX ----------------------------------------------------------------------


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')
def test_jit_trace_passes_its_sanity_check_and_matches_eager() -> None:
    """torch.jit.trace (its check re-runs the trace and compares) at a size where every stage
    pads; a traced module holds at its own size only (torch.export has symbolic sizes)."""
    model = small_backbone(DiNAT)
    image = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        traced = torch.jit.trace(model, image, check_trace=True)
        for out, want in zip(traced(image), model(image), strict=True):
            assert max_relative_error(out, want) <= 1e-6


@pytest.mark.parametrize('cls', [NAT, DiNAT])
def test_exported_backbone_is_one_operator_per_layer_and_matches_eager(cls: type) -> None:
    model = small_backbone(cls)
    image = torch.randn(2, 3, *SIZE)
    program = torch.export.export(model, (image,))
    assert na2d_nodes(program.graph) == 4
    portable = export.portable_program(program)
    assert na2d_nodes(portable.graph) == 0
    with torch.no_grad():
        expected = model(image)
        exported, decomposed = program.module()(image), portable.module()(image)
    for outputs in (exported, decomposed):
        for out, want in zip(outputs, expected, strict=True):
            assert max_relative_error(out, want) <= 1e-5


@pytest.mark.parametrize('cls', [pytest.param(NAT, marks=pytest.mark.slow), DiNAT])
def test_onnx_export_runs_in_onnxruntime_like_eager(cls: type, tmp_path) -> None:
    """Standard ONNX operators only (the default domain), onnxruntime within 1e-5 of eager."""
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime: the export extra')
    model = small_backbone(cls)
    image = torch.randn(1, 3, *SIZE)
    path = tmp_path / 'backbone.onnx'
    onnx_program = export.to_onnx(torch.export.export(model, (image,)), path)
    domains = {node.domain for node in onnx_program.model_proto.graph.node}
    assert domains <= {'', 'ai.onnx'} and not onnx_program.model_proto.functions
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.no_grad():
        expected = model(image)
    for out, want in zip(outputs, expected, strict=True):
        assert max_relative_error(torch.from_numpy(out), want) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('cls', [NAT, DiNAT])
def test_dynamic_onnx_export_holds_at_other_sizes(cls: type, tmp_path) -> None:
    """Exported once with symbolic H and W: the program and the ONNX file at other sizes,
    including sizes that pad at other stages, and below the exported program's own range."""
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime: the export extra')
    model = small_backbone(cls)
    dims = {'x': {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    program = torch.export.export(model, (torch.randn(1, 3, *SIZE),), dynamic_shapes=dims)
    image_shape = next(n for n in program.graph.nodes if n.op == 'placeholder' and n.name == 'x')
    assert all(isinstance(size, torch.SymInt) for size in image_shape.meta['val'].shape[2:])
    path = tmp_path / 'backbone.onnx'
    export.to_onnx(program, path)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for size in (SIZE, OTHER_SIZE, (130, 97), (9, 13)):
        image = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(image)
        if min(size) >= 33:  # the program's range (0/1 specialization of the last stage)
            for out, want in zip(program.module()(image), expected, strict=True):
                assert max_relative_error(out, want) <= 1e-5, size
        outputs = session.run(None, {'x': image.numpy()})
        for out, want in zip(outputs, expected, strict=True):
            assert max_relative_error(torch.from_numpy(out), want) <= 1e-5, size


def test_to_onnx_names_the_missing_packages(monkeypatch) -> None:
    monkeypatch.setattr(export, 'ONNX_PACKAGES', ('onnx', 'nat_mm_no_such_package'))
    model = torch.export.export(torch.nn.Identity(), (torch.randn(1),))
    with pytest.raises(NatMMError, match=r"\['nat_mm_no_such_package'\].*nat_mm\[export\]"):
        export.to_onnx(model)


# --- tools/export.py ------------------------------------------------------------------------------


def test_export_tool_refuses_bad_input(call_tool, capsys, tmp_path) -> None:
    """Exit status 2 and `error: ...` before any export: no model named, an existing output."""
    out = tmp_path / 'model.onnx'
    assert call_tool('export', ['--shape', 64, 64, '--out', out]) == 2
    assert 'give a config or --backbone' in capsys.readouterr().err
    out.write_bytes(b'keep')
    argv = ['--backbone', 'nat-mini', '--shape', 64, 64, '--out', out, '--no-peer']
    assert call_tool('export', argv) == 2
    assert 'pass --force' in capsys.readouterr().err and out.read_bytes() == b'keep'


def test_cascade_detectors_export_their_features_only(repo_root) -> None:
    name = 'cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
    config = repo_root / 'configs/mmdet/nat' / name
    with pytest.raises(NatMMError, match=r'CascadeRoIHead.*--features'):
        build_network(str(config))


@pytest.mark.slow
@pytest.mark.parametrize('file_format', ['onnx', 'exported-program'])
def test_export_tool_writes_and_checks_a_backbone(call_tool, capsys, tmp_path, file_format):
    pytest.importorskip('onnxruntime', reason='onnxruntime: the export extra')
    out = tmp_path / ('nat_mini.onnx' if file_format == 'onnx' else 'nat_mini.pt2')
    argv = ['--backbone', 'nat-mini', '--shape', 64, 96, '--out', out, '--format', file_format]
    assert call_tool('export', [*argv, '--dynamic', '--repeats', 1]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and 'dynamic H and W' in printed
    rows = [line.split('|') for line in printed.splitlines() if line.startswith('| nat-mini')]
    assert len(rows) == 1 and float(rows[0][6]) <= 1e-5  # max rel error
    assert any(line.startswith('| Swin-T') for line in printed.splitlines())


@pytest.mark.slow
def test_segmentor_exports_in_tensor_mode(repo_root, tmp_path) -> None:
    pytest.importorskip('onnxruntime', reason='onnxruntime: the export extra')
    name = 'nat-mini-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py'
    config = repo_root / 'configs/mmseg/nat' / name
    network, label = build_network(str(config))
    report = export_and_check(network, label, (96, 128), tmp_path / 'upernet.onnx', repeats=1)
    (row,) = report['rows']
    assert row['max_rel'] <= 1e-5 and 'tensor mode' in row['name']
