"""na2d on CUDA: backends against the oracle, AMP through the backbones, Flex's compile and mask
caching, and the automatic choice of README.md's backend table.

Every CUDA case is marked `gpu` and skips with 'needs a CUDA device' where there is none. Checks
whose logic holds on CPU too also run on CPU, which proves the test itself on machines without a
GPU: Flex's compile count and mask cache (forward only: Flex has no CPU backward), the automatic
choice, and (with -m slow) AMP through the backbones.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from nat_mm.models import NAT, DiNAT
from nat_mm.ops import last_backend, na2d
from nat_mm.ops.backends import cpu_na, flex_na, natten_na
from nat_mm.ops.reference import na2d_reference, random_inputs

CUDA_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
]
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA_MARKS)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (H, W, kernel_size, dilation): kernels 3-13, odd and non-square maps, H or W == K * d edges,
# uneven sub-lattices, per-axis kernels and dilations.
CASES = [
    (9, 11, 3, 1),
    (5, 5, 5, 1),  # H == W == K
    (14, 21, 7, 2),  # H == K * d
    (21, 22, 7, 3),  # W % d != 0
    (12, 19, (3, 5), (4, 2)),
    (18, 19, 9, 2),  # H == K * d
    (11, 15, 11, 1),
    (13, 27, 13, (1, 2)),
    (29, 26, 13, 2),  # W == K * d
]
HEAD_DIM = 32  # a multiple of 8 (NATTEN's fused kernels), and a Hopper FNA head dim
# (atol, rtol) against the float64 oracle, per dtype; gradients get twice these.
TOLERANCES = {
    torch.float32: (2e-4, 1e-3),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
# NATTEN's fp32 kernels may run on TF32 tensor cores (10-bit mantissa, like fp16).
NATTEN_TOLERANCES = {**TOLERANCES, torch.float32: (2e-3, 2e-3)}


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def _natten_cuda_reason() -> str | None:
    """Why NATTEN's CUDA kernels cannot run here, or None."""
    reason = natten_na.unavailable_reason()
    if reason is None and not natten_na._natten().HAS_LIBNATTEN:
        reason = 'NATTEN was installed without its CUDA kernels (natten.HAS_LIBNATTEN is False)'
    return reason


def _check_against_oracle(backend, case, dtype, with_rpb, tolerances=TOLERANCES) -> None:
    height, width, kernel_size, dilation = case
    shape = (2, height, width, 2, HEAD_DIM)
    q, k, v, rpb = random_inputs(shape, _pair(kernel_size), with_rpb, dtype)
    inputs = [x.cuda().requires_grad_() for x in (q, k, v, rpb) if x is not None]
    reference_inputs = [x.double().requires_grad_() for x in (q, k, v, rpb) if x is not None]
    table = inputs[3] if with_rpb else None
    out = na2d(*inputs[:3], kernel_size, dilation, rpb=table, backend=backend)
    ref_table = reference_inputs[3] if with_rpb else None
    ref = na2d_reference(*reference_inputs[:3], kernel_size, dilation, ref_table)
    assert out.dtype == dtype and out.shape == shape and out.is_cuda
    atol, rtol = tolerances[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype).cuda())
    ref_grads = torch.autograd.grad(ref, reference_inputs, grad_out.double())
    for name, grad, ref_grad in zip('qkvr', grads, ref_grads, strict=False):
        # rpb gradients sum over every query: scale the tolerance with the magnitude.
        grad_atol = atol * (1 + ref_grad.abs().max().item()) if name == 'r' else atol
        torch.testing.assert_close(
            grad.double().cpu(), ref_grad, atol=2 * grad_atol, rtol=2 * rtol, msg=name
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('backend', ['flex', 'torch'])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('with_rpb', [True, False], ids=['rpb', 'no_rpb'])
@pytest.mark.parametrize('case', CASES, ids=str)
def test_flex_and_torch_match_oracle(backend, case, with_rpb, dtype) -> None:
    _check_against_oracle(backend, case, dtype, with_rpb)


@pytest.mark.gpu
@pytest.mark.natten
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_natten_matches_oracle(case, dtype) -> None:
    reason = _natten_cuda_reason()
    if reason is not None:
        pytest.skip(reason)
    _check_against_oracle('natten', case, dtype, with_rpb=False, tolerances=NATTEN_TOLERANCES)


# Relative error (norm of the difference / norm of fp32) of AMP against fp32, measured on CPU
# (torch backend): bf16 1.5e-2 features / 1.2e-2 gradients, fp16 1.9e-3 / 1.6e-3.
AMP_TOLERANCES = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
BACKBONES = {
    'nat-tiny': lambda: NAT(arch='tiny', drop_path_rate=0.0),
    'dinat-tiny-coco': lambda: DiNAT(arch='tiny', dilations='coco', drop_path_rate=0.0),
}


def _features_and_grads(model, image, device, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        features = model(image)
    weights = torch.Generator().manual_seed(3)
    loss = sum(
        (f.float() * torch.randn(f.shape, generator=weights).to(device)).sum() for f in features
    )
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return [f.detach().float() for f in features], grads


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


# On CPU (several seconds each on 2 busy cores) with -m slow.
AUTOCAST_CASES = [
    pytest.param(
        backbone,
        dtype,
        device,
        marks=CUDA_MARKS if device == 'cuda' else [pytest.mark.slow],
        id=f'{backbone}-{str(dtype)[6:]}-{device}',
    )
    for backbone in BACKBONES
    for dtype in (torch.float16, torch.bfloat16)
    for device in ('cpu', 'cuda')
]
IMAGE_SHAPES = {'cpu': (1, 3, 64, 64), 'cuda': (2, 3, 160, 224)}


@pytest.mark.parametrize(('backbone', 'dtype', 'device'), AUTOCAST_CASES)
def test_autocast_through_backbones(backbone: str, dtype: torch.dtype, device: str) -> None:
    """Mixed precision (as the AMP configs train) gives fp32's features and gradients."""
    torch.manual_seed(0)
    model = BACKBONES[backbone]()
    model.init_weights()
    model = model.eval().to(device)  # eval: no stochastic depth, same graph twice
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(IMAGE_SHAPES[device], generator=generator).to(device)
    features32, grads32 = _features_and_grads(model, image, device, None)
    features, grads = _features_and_grads(model, image, device, dtype)
    assert all(f.isfinite().all() for f in features) and grads.isfinite().all()
    for stage, (feature, feature32) in enumerate(zip(features, features32, strict=True)):
        error = _relative_error(feature, feature32)
        assert error < AMP_TOLERANCES[dtype], f'stage {stage}: {error:.2e}'
    assert _relative_error(grads, grads32) < AMP_TOLERANCES[dtype]


def _unique_graphs() -> int:
    # Incremented once per graph that dynamo compiles (torch/_dynamo/output_graph.py).
    return counters['stats']['unique_graphs']


@pytest.mark.parametrize(
    ('device', 'dtype'),
    [
        ('cpu', torch.float32),
        *(pytest.param('cuda', dtype, marks=CUDA_MARKS, id=f'cuda-{dtype}') for dtype in DTYPES),
    ],
)
def test_flex_compiles_once_for_many_sizes_and_reuses_masks(device: str, dtype) -> None:
    """Detection changes the map size every iteration: no recompile, recurring sizes hit the
    block-mask cache. Forward only on CPU (no Flex backward there), forward + backward on CUDA.
    """
    # The configuration of tests/test_ops_optional_backends.py's Flex case (batch 2, 2 heads,
    # head_dim 16, RPB), so that a full run compiles Flex for CPU once for both.
    probe = torch.zeros(1, 9, 9, 2, 16, dtype=dtype, device=device)
    with torch.no_grad():
        reason = flex_na.can_run(probe, probe, probe, (3, 3), (1, 1), None)
    if flex_na.unavailable_reason() or reason:
        pytest.skip(f'flex cannot run here: {flex_na.unavailable_reason() or reason}')
    # New sizes, W <= 16 (one tile column) among them, and two recurring ones. No map of one or
    # two tiles: dynamo specializes sizes of 1, and a size equal to another (2 = batch = heads)
    # until it sees them differ, either of which costs one more compile.
    sizes = [(20, 24), (33, 15), (41, 29), (20, 24), (26, 35), (33, 15)]
    with_grad = device == 'cuda'
    added, hits = [], []
    for height, width in sizes:
        q, k, v, rpb = random_inputs((2, height, width, 2, 16), (3, 3), True, dtype)
        inputs = [x.to(device).requires_grad_(with_grad) for x in (q, k, v, rpb)]
        before = _unique_graphs()
        with torch.set_grad_enabled(with_grad):
            out = na2d(*inputs[:3], 3, rpb=inputs[3], backend='flex')
            if with_grad:
                out.float().square().sum().backward()
        added.append(_unique_graphs() - before)
        hits.append(flex_na._block_mask.cache_info().hits)
    # The first call compiles Flex (if no earlier test did); on CUDA the second may recompile the
    # compiled `create_block_mask` (flex_na passes `_compile=True`) once with dynamic sizes.
    # After that no size compiles anything.
    warmup = 1 if device == 'cpu' else 2
    assert added[warmup:] == [0] * (len(sizes) - warmup), f'graphs compiled per call: {added}'
    # The sizes seen before (calls 3 and 5) take their block mask from the cache.
    assert hits[3] > hits[2] and hits[5] > hits[4]
    assert inputs[0].grad is None or inputs[0].grad.isfinite().all()


def _expected_choice(
    device: str, dtype: torch.dtype, head_dim: int, with_rpb: bool, auto_on_cpu: str
) -> str:
    """README.md's table: on CPU `auto_on_cpu` (the `auto_cpu_backend` fixture: `cpu` wherever
    a C compiler exists) for the kernel's dtypes, else `torch`; on CUDA `natten` for
    layers without RPB (if its kernels are installed and take the head_dim), else `flex`, and
    `torch` where neither runs (float64; head_dim < 16, too small for Flex's CUDA kernels)."""
    if device == 'cpu':
        return auto_on_cpu if dtype in cpu_na.DTYPES else 'torch'
    natten_runs = _natten_cuda_reason() is None and dtype in natten_na.DTYPES
    if not with_rpb and natten_runs and head_dim % 8 == 0:
        return 'natten'
    if dtype == torch.float64 or head_dim < 16:
        return 'torch'
    return 'flex'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('with_rpb', [True, False], ids=['rpb', 'no_rpb'])
@pytest.mark.parametrize('head_dim', [32, 24, 12])
@pytest.mark.parametrize('dtype', [*DTYPES, torch.float64], ids=str)
def test_automatic_choice_follows_the_readme(
    device, dtype, head_dim, with_rpb, auto_cpu_backend
) -> None:
    q, k, v, rpb = random_inputs((2, 9, 11, 2, head_dim), (3, 3), with_rpb, dtype)
    moved = [x.to(device) if x is not None else None for x in (q, k, v, rpb)]
    with torch.no_grad():
        out = na2d(*moved[:3], 3, rpb=moved[3])
    assert last_backend() == _expected_choice(device, dtype, head_dim, with_rpb, auto_cpu_backend)
    assert out.dtype == dtype and out.device.type == device
