"""DiNAT_s backbone: parity with the independent reference, presets (published parameters, MACs,
dilations), flags, upstream checkpoints, and the published Mask R-CNN / Cascade / UPerNet configs.

Expected values are transcribed from upstream (SHI-Labs/Neighborhood-Attention-Transformer
``classification/dinats.py``, ``detection/configs/dinat_s``, ``segmentation/configs/dinat_s``,
``DiNAT.md``; docs/original-models.md section 5), not read from the code or configs under test.
"""

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from torch import nn

import nat_mm.checkpoint.strict as strict_module
from nat_mm.analysis import flops as flops_api
from nat_mm.apis.config import drop_amp_loss_scale
from nat_mm.checkpoint import convert_checkpoint_file
from nat_mm.errors import NatMMError
from nat_mm.models import DINATS_ARCHS, DiNATs
from nat_mm.ops import flops
from nat_mm.testing import dinats_reference as ref

ROOT = Path(__file__).resolve().parents[1]

# A narrow 4-stage model: cheap, but every code path of the published variants.
CFG = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mlp_ratio=4.0)
DILATIONS = [[1, 4], [1, 3], [1, 2], [2, 1]]
KERNEL = 3


def build(**overrides) -> DiNATs:
    cfg = dict(arch=None, **CFG, kernel_size=KERNEL, dilations=DILATIONS, drop_path_rate=0.0)
    cfg.update(overrides)
    return DiNATs(**cfg)


def upstream_state_dict(classifier=False, out_indices=(0, 1, 2, 3), dtype=torch.float64, seed=0):
    return ref.random_upstream_state_dict(
        CFG['embed_dim'], CFG['depths'], CFG['num_heads'], CFG['mlp_ratio'], KERNEL,
        out_indices, classifier, seed=seed, dtype=dtype,
    )  # fmt: skip


def reference_maps(sd, image, out_indices=(0, 1, 2, 3)):
    return ref.dinats_forward(sd, image, CFG['num_heads'], KERNEL, DILATIONS, out_indices)


def max_relative_error(outputs, expected) -> float:
    assert len(outputs) == len(expected)
    errors = []
    for out, exp in zip(outputs, expected, strict=True):
        assert out.shape == exp.shape and out.dtype == exp.dtype
        errors.append(((out - exp).abs().max() / exp.abs().max()).item())
    return max(errors)


# --- parity with the reference written from upstream's dinats.py ------------------------------
@pytest.mark.parametrize(
    ('dtype', 'size'),
    [
        (torch.float64, (64, 64)),
        (torch.float64, (61, 50)),  # not multiples of 4: the stem pads; odd maps: merging pads
        (torch.float64, (45, 77)),
        (torch.float64, (9, 13)),  # smaller than every window: attention pads
        (torch.float32, (37, 70)),
    ],
)
def test_matches_reference(dtype, size):
    sd = upstream_state_dict(dtype=dtype)
    model = build().to(dtype).eval()
    model.load_state_dict(sd, strict=True)  # upstream's names, one-to-one
    image = torch.randn(2, 3, *size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = max_relative_error(model(image), reference_maps(sd, image))
    print(f'DiNATs {dtype} {size}: max relative error {error:.2e}')
    assert error <= (1e-12 if dtype == torch.float64 else 2e-5)


def test_reference_is_independent_of_the_model_code():
    import ast

    tree = ast.parse(Path(ref.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {'__future__', 'math', 'torch', 'torch.nn.functional',
                        'nat_mm.testing.nat_reference'}  # fmt: skip


def test_output_shapes_strides_and_channels():
    model = build().eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 112, 137))
    assert [tuple(o.shape[1:]) for o in outputs] == [
        (16, 28, 35), (32, 14, 18), (64, 7, 9), (128, 4, 5)
    ]  # fmt: skip
    assert model.out_channels == (16, 32, 64, 128) and model.strides == (4, 8, 16, 32)


# --- presets -------------------------------------------------------------------------------------
# DiNAT.md: params of the ImageNet classifier (1000-class head), GMACs at 224.
PUBLISHED = {
    'tiny': (28, 4.5),
    'small': (50, 8.7),
    'base': (88, 15.4),
    'large': (197, 34.5),
}
# classification/dinats.py: embed_dim, depths, heads (mlp_ratio 4, kernel 7 everywhere).
UPSTREAM_ARCHS = {
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


class Classifier(nn.Module):
    """Test-only ImageNet model as upstream: last stage -> its norm -> average pool -> Linear."""

    def __init__(self, arch: str, dilations: str | None = None) -> None:
        super().__init__()
        # out_indices=(3,): norm3 plays the role of the classifier's final `norm`.
        self.backbone = DiNATs(arch=arch, dilations=dilations, out_indices=(3,))
        self.head = nn.Linear(self.backbone.out_channels[-1], 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean(dim=(2, 3)))


@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_preset_parameter_counts_are_upstreams(arch):
    embed_dim, depths, heads = UPSTREAM_ARCHS[arch]
    assert DINATS_ARCHS[arch] == (embed_dim, depths, heads, 4.0, None)
    with torch.device('meta'):
        model = Classifier(arch)
        upstream = ref.random_upstream_state_dict(embed_dim, depths, heads, 4.0, 7, classifier=True)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(t.numel() for t in upstream.values())  # exactly upstream's model
    assert round(count / 1e6) == PUBLISHED[arch][0]
    print(f'DiNAT_s-{arch}: {count} parameters (published {PUBLISHED[arch][0]}M)')


@pytest.mark.parametrize(
    ('arch', 'dilations', 'published'),
    [
        ('tiny', None, 4.5),
        *(
            pytest.param(arch, None, PUBLISHED[arch][1], marks=pytest.mark.slow)
            for arch in ('small', 'base', 'large')
        ),
        pytest.param('large', 'imagenet-384', 101.5, marks=pytest.mark.slow),
    ],
)
def test_published_macs(arch, dilations, published):
    flops.register_flop_handles()
    side = 384 if dilations == 'imagenet-384' else 224
    _, macs, uncounted = flops_api.count(Classifier(arch, dilations), torch.rand(1, 3, side, side))
    assert flops.OP_NAME not in uncounted
    gmacs = macs / 1e9
    print(f'DiNAT_s-{arch} {side}: {gmacs:.3f} GMACs (published {published})')
    assert abs(gmacs - published) <= 0.02 * published


# Upstream's lists, transcribed (classification/dinats.py, the dinat_s configs).
DEPTH_18 = (2, 2, 18, 2)
SCHEDULES = {
    ('imagenet-224', 6): [[1, 8], [1, 4], [1, 2, 1, 2, 1, 2], [1, 1]],
    ('imagenet-224', 18): [[1, 8], [1, 4], [1, 2] * 9, [1, 1]],
    ('imagenet-384', 18): [[1, 13], [1, 6], [1, 3] * 9, [1, 1]],
    ('coco', 6): [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7], [1, 3]],
    ('coco', 18): [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3]],
    ('ade20k-512', 6): [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4], [1, 2]],
    ('ade20k-512', 18): [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2]],
    ('ade20k-640', 18): [
        [1, 20], [1, 10], [1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5], [1, 2]
    ],
}  # fmt: skip


@pytest.mark.parametrize(('name', 'depth'), list(SCHEDULES))
def test_dilation_schedules_are_upstreams(name, depth):
    arch = 'tiny' if depth == 6 else 'small'
    with torch.device('meta'):
        model = DiNATs(arch=arch, dilations=None if name == 'imagenet-224' else name)
    assert [list(stage) for stage in model.dilations] == SCHEDULES[(name, depth)]


def test_registered_in_the_root_mmdet_and_mmseg_registries():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    for registry in (MODELS, MMDET_MODELS, MMSEG_MODELS):
        with torch.device('meta'):
            model = registry.build(dict(type='DiNATs', arch='tiny', dilations='coco'))
        assert isinstance(model, DiNATs) and model.out_channels == (96, 192, 384, 768)


# --- flags: as NAT's, under upstream's `layers` name ------------------------------------------
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen_stages):
    model = build(frozen_stages=frozen_stages).train()
    frozen = ['patch_embed.'] if frozen_stages >= 0 else []
    frozen += [p for i in range(max(frozen_stages, 0)) for p in (f'layers.{i}.', f'norm{i}.')]
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(tuple(frozen))), name
    for name, module in model.named_modules():
        if name and (name + '.').startswith(tuple(frozen)):
            assert not module.training, name


def test_with_cp_gives_identical_outputs_and_gradients():
    results = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = build(with_cp=with_cp, drop_path_rate=0.3).train()
        torch.manual_seed(1)  # same drop-path masks in both runs
        outputs = model(torch.randn(2, 3, 36, 44, generator=torch.Generator().manual_seed(2)))
        sum((o * o).mean() for o in outputs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append(([o.detach() for o in outputs], grads))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (0, 1, 2), (1,)])
def test_every_built_parameter_gets_a_gradient(out_indices):
    model = build(out_indices=out_indices).train()
    sum(o.square().mean() for o in model(torch.randn(2, 3, 33, 47))).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    last = out_indices[-1]
    assert len(model.layers) == last + 1 and model.layers[last].downsample is None


# --- upstream checkpoints load strictly ----------------------------------------------------------
def file_weights(**options) -> dict[str, torch.Tensor]:
    """Random upstream-layout weights as files hold them (fp32), widened back to float64 for the
    reference (exact: the fp32 model loses nothing of them)."""
    return {k: v.float().double() for k, v in upstream_state_dict(**options).items()}


IMAGE = torch.randn(1, 3, 30, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def load_file(path, monkeypatch, **overrides) -> tuple[DiNATs, list[str]]:
    """DiNATs initialised from ``path`` as a config's ``init_cfg`` does; the loader's log."""
    logged = []
    monkeypatch.setattr(strict_module, 'print_log', lambda msg, **options: logged.append(msg))
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **overrides)
    model.init_weights()
    return model.double().eval(), logged


def test_upstream_imagenet_checkpoint_loads_strictly(tmp_path, monkeypatch):
    # classification/dinats.py: norm, head, no norm{i}; saved flat (upstream loads it with
    # model.load_state_dict(checkpoint)). Stored in fp32, as the released files.
    sd = file_weights(classifier=True)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / 'dinat_s_in1k_224.pth')
    model, logged = load_file(tmp_path / 'dinat_s_in1k_224.pth', monkeypatch)
    loaded = model.state_dict()
    backbone_keys = sorted(k for k in sd if not k.startswith(('norm.', 'head.')))
    # Zero missing, zero unexpected: every backbone key of the file is a model key and back,
    # except the output norms, which ImageNet files lack (they keep their init, as upstream).
    assert sorted(k for k in loaded if not k.startswith('norm')) == backbone_keys
    assert all(torch.equal(loaded[k], sd[k]) for k in backbone_keys)
    message = next(m for m in logged if m.startswith('Loaded original checkpoint'))
    assert "ignored 4 keys the backbone does not use ['head.bias', 'head.weight', 'norm.bias'" in (
        message
    )
    kept = [f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')]
    assert message.endswith(f'kept the initialisation of {kept}')
    # With the classifier's norm as norm3 and its head, the loaded backbone is upstream's model.
    model.norm3.load_state_dict({'weight': sd['norm.weight'], 'bias': sd['norm.bias']})
    with torch.no_grad():
        pooled = model(IMAGE)[-1].mean(dim=(2, 3))
        logits = nn.functional.linear(pooled, sd['head.weight'], sd['head.bias'])
    expected = ref.dinats_classify(sd, IMAGE, CFG['num_heads'], KERNEL, DILATIONS)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('ddp', [False, True])
def test_upstream_detection_checkpoint_loads_strictly(ddp, tmp_path, monkeypatch):
    # detection/dinats.py under mmdet 2.x: state_dict with backbone. (and module. under DDP).
    sd = file_weights(seed=4)
    prefix = 'module.backbone.' if ddp else 'backbone.'
    state_dict = {f'{prefix}{k}': v.float() for k, v in sd.items()}
    state_dict['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 96, 1, 1)
    state_dict['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(81, 1024)
    torch.save({'state_dict': state_dict, 'meta': {'epoch': 36}}, tmp_path / 'mask_rcnn.pth')
    model, logged = load_file(tmp_path / 'mask_rcnn.pth', monkeypatch)
    assert sorted(model.state_dict()) == sorted(sd)
    assert any(
        'Loaded mmdet checkpoint' in m and 'kept the initialisation of []' in m for m in logged
    )
    with torch.no_grad():
        error = max_relative_error(model(IMAGE), reference_maps(sd, IMAGE))
    assert error <= 1e-12


def test_full_checkpoint_loads_into_a_pruned_backbone(tmp_path, monkeypatch):
    sd = file_weights(seed=5)
    state_dict = {f'backbone.{k}': v.float() for k, v in sd.items()}
    torch.save({'state_dict': state_dict}, tmp_path / 'seg.pth')
    model, logged = load_file(tmp_path / 'seg.pth', monkeypatch, out_indices=(0, 2))
    assert model.pruned_prefixes == ('layers.2.downsample.', 'layers.3.', 'norm3.')
    assert any('does not build layers.2.downsample.*, layers.3.*, norm3.*' in m for m in logged)
    with torch.no_grad():
        full = reference_maps(sd, IMAGE, (0, 2))
        assert max_relative_error(model(IMAGE), full) <= 1e-12


def test_bad_keys_are_all_reported(tmp_path, monkeypatch):
    sd = upstream_state_dict(classifier=True)
    del sd['layers.1.blocks.0.mlp.fc1.bias']
    sd['layers.1.downsample.reduction.weight'] = torch.zeros(64, 32)  # NAT's shape would be conv
    sd['levels.0.blocks.0.attn.qkv.weight'] = torch.zeros(48, 16)  # a NAT key
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(NatMMError) as info:
        load_file(tmp_path / 'bad.pth', monkeypatch)
    message = str(info.value)
    assert '1 missing keys: layers.1.blocks.0.mlp.fc1.bias;' in message
    assert '1 unexpected keys: levels.0.blocks.0.attn.qkv.weight;' in message
    assert 'layers.1.downsample.reduction.weight (checkpoint [64, 32], model [64, 128])' in message


def test_convert_tool_keeps_upstream_names_and_refuses_huggingface(tmp_path):
    sd = {k: v.float() for k, v in upstream_state_dict(classifier=True).items()}
    torch.save({'model': sd}, tmp_path / 'in1k.pth')
    written, source_format, _ = convert_checkpoint_file(
        tmp_path / 'in1k.pth', tmp_path / 'mmdet.pth', 'mmdet'
    )
    assert source_format == 'original'
    mmdet = torch.load(written, weights_only=True)['state_dict']
    assert sorted(mmdet) == sorted(f'backbone.{k}' for k in sd)
    convert_checkpoint_file(written, tmp_path / 'back.pth', 'original')
    back = torch.load(tmp_path / 'back.pth', weights_only=True)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(NatMMError, match='DiNAT_s checkpoint has no HuggingFace layout'):
        convert_checkpoint_file(tmp_path / 'in1k.pth', tmp_path / 'hf/', 'huggingface')


# --- the published configs -----------------------------------------------------------------------
MMDET = ROOT / 'configs/mmdet/dinat_s'
MMSEG = ROOT / 'configs/mmseg/dinat_s'
IN1K = 'checkpoints/dinat_s_{}_in1k_224.pth'
IN22K = 'checkpoints/dinat_s_large_in22k_224.pth'
CASCADE = 'cascade-mask-rcnn_dinats-{}_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
UPERNET = 'dinats-{}-in{}-pre_upernet_8xb2-amp-160k_ade20k-512x512.py'
# file -> (arch, drop_path, dilation list, lr, checkpoint); every recipe is fp16 upstream
# (Fp16OptimizerHook with its default static loss scale 512, DiNAT_s-L included).
RECIPES = {
    MMDET / 'mask-rcnn_dinats-tiny_fpn_amp-ms-crop-3x_coco.py': (
        'tiny', 0.2, ('coco', 6), 1e-4, IN1K.format('tiny')),
    MMDET / 'mask-rcnn_dinats-small_fpn_amp-ms-crop-3x_coco.py': (
        'small', 0.35, ('coco', 18), 1e-4, IN1K.format('small')),
    MMDET / CASCADE.format('tiny'): ('tiny', 0.3, ('coco', 6), 1e-4, IN1K.format('tiny')),
    MMDET / CASCADE.format('small'): ('small', 0.5, ('coco', 18), 1e-4, IN1K.format('small')),
    MMDET / CASCADE.format('base'): ('base', 0.6, ('coco', 18), 7.5e-5, IN1K.format('base')),
    MMDET / CASCADE.format('large'): ('large', 0.6, ('coco', 18), 5e-5, IN22K),
    MMSEG / UPERNET.format('tiny', '1k'): (
        'tiny', 0.3, ('ade20k-512', 6), 6e-5, IN1K.format('tiny')),
    MMSEG / UPERNET.format('small', '1k'): (
        'small', 0.3, ('ade20k-512', 18), 6e-5, IN1K.format('small')),
    MMSEG / UPERNET.format('base', '1k'): (
        'base', 0.3, ('ade20k-512', 18), 6e-5, IN1K.format('base')),
    MMSEG / UPERNET.format('large', '22k'): ('large', 0.3, ('ade20k-640', 18), 6e-5, IN22K),
}  # fmt: skip
CHANNELS = {'tiny': 96, 'small': 96, 'base': 128, 'large': 192}


def load(path: Path, options: dict | None = None) -> Config:
    cfg = Config.fromfile(str(path))
    if options:
        cfg.merge_from_dict(options)
    init_default_scope(cfg.default_scope)
    return cfg


def test_every_published_config_exists():
    assert sorted(RECIPES) == sorted([*MMDET.glob('*.py'), *MMSEG.glob('*.py')])


@pytest.mark.parametrize('path', list(RECIPES), ids=lambda path: path.name)
def test_config_follows_the_published_recipe_and_builds(path):
    arch, drop_path, schedule, lr, checkpoint = RECIPES[path]
    cfg = load(path)
    backbone_cfg = cfg.model.backbone
    assert backbone_cfg.type == 'DiNATs' and backbone_cfg.arch == arch
    assert backbone_cfg.kernel_size == 7
    assert backbone_cfg.drop_path_rate == pytest.approx(drop_path)
    assert backbone_cfg.init_cfg == dict(type='Pretrained', checkpoint=checkpoint)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and 'amp-' in path.name
    assert cfg.optim_wrapper.loss_scale == 512.0
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(lr)
    assert cfg.optim_wrapper.optimizer.weight_decay == (0.01 if 'upernet' in path.name else 0.05)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
        'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)
    }  # fmt: skip
    assert 'nat_mm' in cfg.custom_imports['imports']
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert backbone.out_channels == tuple(CHANNELS[arch] * 2**i for i in range(4))
    for key in ('neck', 'decode_head'):
        if key in cfg.model:
            assert list(cfg.model[key].in_channels) == list(backbone.out_channels), key
    if 'auxiliary_head' in cfg.model:
        assert cfg.model.auxiliary_head.in_channels == backbone.out_channels[2]
    assert [list(stage) for stage in backbone.dilations] == SCHEDULES[schedule]


def small_config(path: Path) -> Config:
    """A 4-layer 32-channel DiNATs with a dilated layer, no AMP, no weights, few RoIs."""
    cfg = load(path)
    options = {
        'model.backbone.arch': None,
        'model.backbone.embed_dim': 32,
        'model.backbone.depths': [1, 1, 1, 1],
        'model.backbone.num_heads': [1, 2, 4, 8],
        'model.backbone.mlp_ratio': 2.0,
        'model.backbone.dilations': [[1], [2], [1], [1]],
        'model.backbone.init_cfg': None,
        'optim_wrapper.type': 'OptimWrapper',
    }
    for key in ('neck', 'decode_head'):
        if key in cfg.model:
            options[f'model.{key}.in_channels'] = [32, 64, 128, 256]
    if 'auxiliary_head' in cfg.model:
        options['model.auxiliary_head.in_channels'] = 128
        options['model.data_preprocessor.size'] = (64, 64)
    else:
        options['model.test_cfg.rpn.max_per_img'] = 50
    cfg.merge_from_dict(options)
    drop_amp_loss_scale(cfg, options)
    rcnn = cfg.model.get('train_cfg', {}).get('rcnn')
    for stage in rcnn if isinstance(rcnn, list) else [rcnn]:
        if stage is not None:
            stage.sampler.num = 32
    return cfg


def batch_for(scope: str) -> dict:
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs

        return demo_mm_inputs(
            batch_size=1, image_shapes=[(3, 64, 64)], num_items=[3], num_classes=80,
            with_mask=True,
        )  # fmt: skip
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    generator = torch.Generator().manual_seed(0)
    batch = dict(inputs=[], data_samples=[])
    for _ in range(2):  # UPerNet's pooling BatchNorm cannot train on one image
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64), generator=generator))
        batch['inputs'].append(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8))
        batch['data_samples'].append(sample)
    return batch


@pytest.mark.parametrize(
    'name',
    [
        'mask-rcnn_dinats-tiny_fpn_amp-ms-crop-3x_coco.py',
        pytest.param(CASCADE.format('tiny'), marks=pytest.mark.slow),  # ~30 s on 2 busy cores
        UPERNET.format('tiny', '1k'),
    ],
)
def test_one_training_step_on_cpu(name):
    path = (MMSEG if 'upernet' in name else MMDET) / name
    cfg = small_config(path)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    watched = model.backbone.layers[0].downsample.reduction.weight
    before = watched.detach().clone()
    model.train()
    log_vars = model.train_step(batch_for(cfg.default_scope), optim_wrapper)
    assert torch.isfinite(torch.as_tensor(log_vars['loss'])) and log_vars['loss'] > 0
    assert not torch.equal(before, watched.detach()), 'the step left the backbone as is'
