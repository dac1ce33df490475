"""NAT / DiNAT backbone: parity with the independent reference, shapes, flags, presets."""

import pytest
import torch

from nat_mm.models import DINAT_ARCHS, NAT, NAT_ARCHS, DiNAT
from nat_mm.testing import nat_reference as ref

# A narrow 4-stage model: cheap, but every code path of the published variants.
SMALL_CFG = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mlp_ratio=2.0)
DILATIONS = [[1, 4], [3, 1], [1, 2], [1, 1]]
# Narrower and shallower still, for the tests of flags.
FLAGS_CFG = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), mlp_ratio=1.0)
FLAGS_DILATIONS = [[3], [2], [1, 2], [1]]


def build(cls=NAT, **overrides):
    cfg = dict(arch=None, **SMALL_CFG, kernel_size=5, drop_path_rate=0.0)
    cfg.update(overrides)
    return cls(**cfg)


def build_flags_model(cls=NAT, **overrides):
    cfg = dict(arch=None, **FLAGS_CFG, kernel_size=3, drop_path_rate=0.0)
    if cls is DiNAT:
        cfg['dilations'] = FLAGS_DILATIONS
    cfg.update(overrides)
    return cls(**cfg)


def random_model_and_state_dict(cls, layer_scale, kernel_size, dilations, dtype, out_indices):
    model = build(
        cls,
        layer_scale=1e-5 if layer_scale else None,
        kernel_size=kernel_size,
        dilations=dilations,
        out_indices=out_indices,
    )
    sd = ref.random_original_state_dict(
        32, (2, 2, 2, 2), (1, 2, 4, 8), 2.0, kernel_size, layer_scale, out_indices, dtype=dtype
    )
    model.to(dtype).load_state_dict(sd, strict=True)
    return model.eval(), sd


@pytest.mark.parametrize(
    ('cls', 'layer_scale', 'kernel_size', 'dilations', 'dtype', 'size'),
    [
        (NAT, False, 5, None, torch.float64, (64, 64)),
        (NAT, True, 7, None, torch.float64, (45, 77)),
        (DiNAT, True, 5, DILATIONS, torch.float64, (61, 50)),
        (DiNAT, False, 3, DILATIONS, torch.float64, (9, 13)),  # smaller than every window
        (DiNAT, False, 5, DILATIONS, torch.float32, (37, 70)),
        (NAT, True, 7, None, torch.float32, (5, 3)),
    ],
)
def test_matches_reference(cls, layer_scale, kernel_size, dilations, dtype, size):
    out_indices = (0, 1, 2, 3)
    model, sd = random_model_and_state_dict(
        cls, layer_scale, kernel_size, dilations, dtype, out_indices
    )
    image = torch.randn(2, 3, *size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(image)
        expected = ref.nat_forward(
            sd, image, (1, 2, 4, 8), kernel_size, dilations or [[1, 1]] * 4, out_indices
        )
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    assert len(outputs) == len(expected) == 4
    for out, exp in zip(outputs, expected, strict=True):
        assert out.shape == exp.shape and out.dtype == dtype
        error = (out - exp).abs().max().item()
        print(f'{cls.__name__} {dtype} {size}: max abs error {error:.2e}')
        assert error <= tolerance * exp.abs().max().item()


def test_dinat_default_dilations_are_the_imagenet_schedule():
    with torch.device('meta'):
        assert DiNAT(arch='mini').dilations == ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
        assert NAT(arch='mini').dilations == ((1,) * 3, (1,) * 4, (1,) * 6, (1,) * 5)
        assert DiNAT(arch='tiny', dilations='coco').dilations[2] == (1, 3, 1, 5, 1, 7) * 3


@pytest.mark.parametrize(
    ('size', 'expected_hw'),
    [
        ((512, 512), [(128, 128), (64, 64), (32, 32), (16, 16)]),
        ((511, 511), [(128, 128), (64, 64), (32, 32), (16, 16)]),
        ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)]),
        ((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ],
)
def test_output_shapes(size, expected_hw):
    model = build_flags_model(DiNAT).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape[2:]) for o in outputs] == expected_hw
    assert [o.shape[1] for o in outputs] == list(model.out_channels) == [16, 32, 64, 128]
    assert model.strides == (4, 8, 16, 32)


@pytest.mark.parametrize('size', [(64, 64), (33, 47)])
def test_coco_dilations_run_on_small_images(size):
    # Dilation 28 at stage 0 needs maps of 196: the layer pads, whatever the input size.
    model = DiNAT(
        arch=None,
        embed_dim=16,
        depths=(3, 4, 6, 5),
        num_heads=(1, 1, 2, 4),
        mlp_ratio=1.0,
        dilations='coco',
    ).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, *size))
    assert [o.shape[2] for o in outputs] == [-(-size[0] // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_mini_preset_on_a_non_square_input():
    model = NAT(arch='mini', out_indices=(1, 3)).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 112, 137))
    assert model.out_channels == (128, 512) and model.strides == (8, 32)
    assert [tuple(o.shape) for o in outputs] == [(1, 128, 14, 18), (1, 512, 4, 5)]
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm1')


def test_out_indices_subset_returns_the_same_maps():
    full, sd = random_model_and_state_dict(NAT, False, 5, None, torch.float64, (0, 1, 2, 3))
    part = build(out_indices=(0, 2)).double().eval()
    # Stage 3 and stage 2's downsampler are not built (tests/test_backbone_pruning.py).
    dropped = ('norm1.', 'norm3.', 'levels.3.', 'levels.2.downsample.')
    part.load_state_dict({k: v for k, v in sd.items() if not k.startswith(dropped)})
    image = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        all_maps, some_maps = full(image), part(image)
    assert len(some_maps) == 2
    torch.testing.assert_close(some_maps[0], all_maps[0], rtol=0, atol=0)
    torch.testing.assert_close(some_maps[1], all_maps[2], rtol=0, atol=0)


EXPECTED_PARAMS_M = {
    (NAT, 'mini'): 19.47,
    (NAT, 'tiny'): 27.39,
    (NAT, 'small'): 49.98,
    (NAT, 'base'): 88.75,
    (DiNAT, 'mini'): 19.47,
    (DiNAT, 'tiny'): 27.39,
    (DiNAT, 'small'): 49.95,
    (DiNAT, 'base'): 88.75,
    (DiNAT, 'large'): 199.41,
}


@pytest.mark.parametrize(('cls', 'arch'), list(EXPECTED_PARAMS_M))
def test_preset_parameter_counts(cls, arch):
    with torch.device('meta'):
        model = cls(arch=arch)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2) == EXPECTED_PARAMS_M[(cls, arch)]
    spec = (DINAT_ARCHS if cls is DiNAT else NAT_ARCHS)[arch]
    has_gamma = any(name.endswith('gamma1') for name, _ in model.named_parameters())
    assert has_gamma == (spec.layer_scale is not None)


def test_layer_scale_only_on_published_variants():
    with torch.device('meta'):
        with_scale = {(c.__name__, a) for c, a in EXPECTED_PARAMS_M if c(arch=a).arch.layer_scale}
    assert with_scale == {('NAT', 'small'), ('NAT', 'base'), ('DiNAT', 'base')}


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3, 4])
def test_frozen_stages(frozen_stages):
    model = build_flags_model(frozen_stages=frozen_stages)
    model.train()
    frozen_prefixes = ['patch_embed.'] if frozen_stages >= 0 else []
    for i in range(max(frozen_stages, 0)):
        frozen_prefixes += [f'levels.{i}.', f'norm{i}.']
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(tuple(frozen_prefixes))), name
    for name, module in model.named_modules():
        if name and (name + '.').startswith(tuple(frozen_prefixes)):
            assert not module.training, name
    # Frozen parameters stay frozen through a training step.
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        sum(o.sum() for o in model(torch.randn(1, 3, 24, 24))).backward()
        optimizer.step()
    for name, value in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], value)
        assert dict(model.named_parameters())[name].grad is None


def test_with_cp_gives_identical_outputs_and_gradients():
    image = torch.randn(2, 3, 36, 44)
    results = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = build_flags_model(DiNAT, with_cp=with_cp, drop_path_rate=0.3, layer_scale=0.5)
        model.train()
        torch.manual_seed(1)  # same drop-path masks in both runs
        outputs = model(image)
        sum((o * o).mean() for o in outputs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append(([o.detach() for o in outputs], grads))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize('rel_pos_bias', [True, False])
def test_every_parameter_gets_a_gradient(rel_pos_bias):
    model = build_flags_model(DiNAT, layer_scale=1e-5, rel_pos_bias=rel_pos_bias)
    model.train()
    sum(o.square().mean() for o in model(torch.randn(1, 3, 33, 47))).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []
    has_rpb = any(name.endswith('attn.rpb') for name, _ in model.named_parameters())
    assert has_rpb == rel_pos_bias


def test_without_rel_pos_bias_matches_reference():
    model = build(rel_pos_bias=False, kernel_size=3).double().eval()
    sd = ref.random_original_state_dict(32, (2, 2, 2, 2), (1, 2, 4, 8), 2.0, 3, False, (0, 1, 2, 3))
    sd = {k: v for k, v in sd.items() if not k.endswith('rpb')}
    model.load_state_dict(sd, strict=True)
    image = torch.randn(1, 3, 30, 26, dtype=torch.float64)
    with torch.no_grad():
        outputs = model(image)
    expected = ref.nat_forward(sd, image, (1, 2, 4, 8), 3, [[1, 1]] * 4, (0, 1, 2, 3))
    for out, exp in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)


def test_dropout_and_drop_path_are_active_only_in_training():
    model = build_flags_model(drop_path_rate=0.5, drop_rate=0.5)
    image = torch.randn(1, 3, 24, 24)
    model.train()
    torch.manual_seed(0)
    first = model(image)[-1]
    second = model(image)[-1]
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image)[-1], model(image)[-1], rtol=0, atol=0)


def test_default_init_follows_upstream():
    model = build(layer_scale=1e-5)
    model.init_weights()
    qkv = model.levels[0].blocks[0].attn.qkv
    assert qkv.bias.abs().max() == 0 and 0.015 < qkv.weight.std() < 0.025
    rpb = model.levels[0].blocks[0].attn.rpb
    assert 0.01 < rpb.std() < 0.03
    assert torch.all(model.levels[1].blocks[1].gamma1 == 1e-5)
    assert torch.all(model.norm2.weight == 1) and torch.all(model.norm2.bias == 0)


def test_registered_in_mmengine_root_registry():
    from mmengine.registry import MODELS

    with torch.device('meta'):
        model = MODELS.build(dict(type='DiNAT', arch='mini', dilations='coco', out_indices=(2,)))
    assert isinstance(model, DiNAT) and model.out_channels == (256,)
    assert MODELS.get('NAT') is NAT
