"""The mmdet / mmseg configs: published recipes, model builds, a real train + predict step per head.

Expected values are transcribed from the published recipes (docs: original-models.md, NAT repo
configs), not read from the configs under test. Models are shrunk for the step tests by
:func:`shrink_backbone` (the same overrides a user passes as ``--cfg-options`` for a CPU smoke run).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmsegmentation is not installed')

# Registered by `import nat_mm` as the configs' custom_imports do (checked in a fresh interpreter
# by test_importing_nat_mm_registers_what_the_configs_name); imported here so that the other tests
# do not depend on that wiring.
import nat_mm.models
import nat_mm.optim  # noqa: F401
from nat_mm.apis.config import drop_amp_loss_scale

ROOT = Path(__file__).resolve().parents[1]
# DiNAT_s configs (their own naming and recipes) are checked in tests/test_dinats.py.
CONFIGS = sorted(
    path
    for scope in ('mmdet', 'mmseg')
    for path in (ROOT / 'configs' / scope).rglob('*.py')
    if 'dinat_s' not in path.parts
)
CONFIG_IDS = [str(path.relative_to(ROOT / 'configs')) for path in CONFIGS]
NAME_PATTERN = re.compile(r'(?P<family>dinat|nat)-(?P<arch>mini|tiny|small|base|large)')

# --- the published recipes (original-models.md sections 1-3) -------------------------------------
CHANNELS = {'mini': 64, 'tiny': 64, 'small': 96, 'base': 128, 'large': 192}
DROP_PATH = {
    'mask-rcnn': {'mini': 0.2, 'tiny': 0.2, 'small': 0.35},
    'cascade-nat': {'mini': 0.2, 'tiny': 0.3, 'small': 0.3, 'base': 0.5},
    'cascade-dinat': {'mini': 0.2, 'tiny': 0.3, 'small': 0.5, 'base': 0.6, 'large': 0.6},
    'upernet': {'mini': 0.2, 'tiny': 0.3, 'small': 0.5, 'base': 0.5, 'large': 0.3},
    'mask2former': {'tiny': 0.3, 'large': 0.3},
}
LAYER_SCALE = {('nat', 'small'), ('nat', 'base'), ('dinat', 'base')}  # 1e-5; others have none
COCO = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
ADE20K_512 = [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]]
ADE20K_640 = [
    [1, 20, 1],
    [1, 5, 1, 10],
    [1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5],
    [1, 2, 1, 2, 1],
]
MASK2FORMER_K11 = [[1, 14, 1], [1, 4, 1, 7], [1, 2, 1, 3] * 4 + [1, 3], [1, 1, 1, 1, 1]]


def recipe_of(path: Path) -> dict:
    """What the published recipe prescribes for the config at ``path`` (from its file name)."""
    name, scope = path.name, path.parts[-3]
    match = NAME_PATTERN.search(name)
    family, arch = match['family'], match['arch']
    if 'mask2former' in name:
        head = 'mask2former'
    elif scope == 'mmseg':
        head = 'upernet'  # also the SegFormer-head example, which keeps the UPerNet recipe
    elif name.startswith('cascade'):
        head = 'cascade'
    else:
        head = 'retinanet' if name.startswith('retinanet') else 'mask-rcnn'
    drop_key = {'cascade': f'cascade-{family}', 'retinanet': 'mask-rcnn'}.get(head, head)
    if family == 'nat':
        checkpoint = f'nat_{arch}.pth'
    elif arch != 'large':
        checkpoint = f'dinat_{arch}_in1k_224.pth'
    else:
        checkpoint = 'dinat_large_in22k_224' + ('_11x11interp' if 'k11' in name else '') + '.pth'
    if head == 'mask2former':
        dilations = MASK2FORMER_K11
    elif scope == 'mmseg':
        dilations = ADE20K_640 if arch == 'large' else ADE20K_512
    else:
        dilations = COCO
    lr = {'upernet': 6e-5}.get(head, 1e-4)
    if head == 'cascade' and family == 'dinat' and arch in ('base', 'large'):
        lr = 7.5e-5
    return dict(
        family=family,
        arch=arch,
        head=head,
        drop_path=DROP_PATH[drop_key][arch],
        checkpoint=checkpoint,
        dilations=dilations,
        kernel_size=11 if 'k11' in name else 7,
        lr=lr,
        # fp16 where published: not DiNAT-L, not the (detectron2, fp32) Mask2Former recipes.
        amp=arch != 'large' and head not in ('mask2former', 'retinanet'),
        # Mask2Former's (detectron2) optimizer decays `rpb`; NAT's mmdet / mmseg recipes do not.
        rpb_decay=head == 'mask2former',
    )


def expected_dilations(recipe: dict, depths: tuple[int, ...]) -> list[list[int]]:
    """Tiles a stage pattern shorter than its depth (the published depth-18 repeats)."""
    return [
        (stage * (depth // len(stage))) if len(stage) < depth else stage
        for stage, depth in zip(recipe['dilations'], depths, strict=True)
    ]


# --- helpers --------------------------------------------------------------------------------------
def load(path: Path, options: dict | None = None) -> Config:
    cfg = Config.fromfile(str(path))  # imports custom_imports: nat_mm (+ mmdet.models for mmseg)
    if options:
        cfg.merge_from_dict(options)
    init_default_scope(cfg.default_scope)
    return cfg


def heads_fed_by_backbone(cfg: Config) -> list[str]:
    """Model keys whose ``in_channels`` must equal the backbone's ``out_channels``."""
    return [key for key in ('neck', 'panoptic_head', 'decode_head') if key in cfg.model]


def shrink_backbone(cfg: Config) -> dict:
    """``--cfg-options`` for a CPU smoke run: a 4-layer 32-channel backbone, no AMP, no weights.

    The model stays of the config's family (NAT or DiNAT, its kernel size), with dilation 2 in
    stage 1 for DiNAT so that the dilated path runs; every head is resized to the new channels.
    """
    dinat = cfg.model.backbone.type == 'DiNAT'
    options = {
        'model.backbone.arch': None,
        'model.backbone.embed_dim': 32,
        'model.backbone.depths': [1, 1, 1, 1],
        'model.backbone.num_heads': [1, 2, 4, 8],
        'model.backbone.mlp_ratio': 2.0,
        'model.backbone.dilations': [[1], [2], [1], [1]] if dinat else None,
        'model.backbone.init_cfg': None,
        'optim_wrapper.type': 'OptimWrapper',
    }
    options.update(
        {f'model.{key}.in_channels': [32, 64, 128, 256] for key in heads_fed_by_backbone(cfg)}
    )
    if 'auxiliary_head' in cfg.model:
        options['model.auxiliary_head.in_channels'] = 128
    return options


def load_small(path: Path, image_size: int) -> Config:
    """The config with :func:`shrink_backbone` applied, sized for a few seconds on a CPU.

    Also: no padding beyond ``image_size``, fewer sampled RoIs / proposals / queries / points (the
    heads keep their structure; only per-image counts shrink).
    """
    cfg = load(path)
    options = shrink_backbone(cfg)
    if cfg.default_scope == 'mmseg':
        options['model.data_preprocessor.size'] = (image_size, image_size)
    elif cfg.model.data_preprocessor.get('batch_augments'):
        options['model.data_preprocessor.batch_augments'] = None  # Mask2Former's 1024 LSJ pad
    mask2former_head = {'mmdet': 'panoptic_head', 'mmseg': 'decode_head'}[cfg.default_scope]
    if cfg.model.get(mask2former_head, {}).get('type') == 'Mask2FormerHead':
        options[f'model.{mask2former_head}.num_queries'] = 20
        options[f'model.{mask2former_head}.train_cfg.num_points'] = 256
    if 'rpn' in cfg.model.get('test_cfg', {}):
        options['model.test_cfg.rpn.max_per_img'] = 50
    cfg.merge_from_dict(options)
    drop_amp_loss_scale(cfg, options)  # as the tools do for `optim_wrapper.type=OptimWrapper`
    rcnn_train_cfg = cfg.model.get('train_cfg', {}).get('rcnn')
    for stage in rcnn_train_cfg if isinstance(rcnn_train_cfg, list) else [rcnn_train_cfg]:
        if stage is not None:
            stage.sampler.num = 32  # of 512 RoIs per image
    return cfg


def build_model(cfg: Config) -> torch.nn.Module:
    torch.manual_seed(0)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


# --- every config -------------------------------------------------------------------------------
def test_importing_nat_mm_registers_what_the_configs_name():
    # A fresh interpreter: the configs only list `custom_imports=['nat_mm']`.
    code = (
        'import nat_mm\n'
        'from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS\n'
        "assert MODELS.get('NAT') and MODELS.get('DiNAT')\n"
        "assert OPTIM_WRAPPER_CONSTRUCTORS.get('NATOptimWrapperConstructor')\n"
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def test_every_published_variant_has_a_config():
    names = {path.name for path in CONFIGS}
    for family in ('nat', 'dinat'):
        for arch in ('mini', 'tiny', 'small'):
            assert f'mask-rcnn_{family}-{arch}_fpn_amp-ms-crop-3x_coco.py' in names
        for arch in ('mini', 'tiny', 'small', 'base', 'large')[: 5 if family == 'dinat' else 4]:
            amp = '' if arch == 'large' else 'amp-'  # DiNAT-L trained in fp32
            assert (
                f'cascade-mask-rcnn_{family}-{arch}_fpn_4conv1fc-giou_{amp}ms-crop-3x_coco.py'
                in names
            )
            assert any(n.startswith(f'{family}-{arch}-') and '_upernet_' in n for n in names)
        assert f'mask-rcnn_{family}-tiny_fpn_amp-1x_coco.py' in names
    for task in ('coco-panoptic.py', 'coco.py', 'ade20k-640x640.py'):
        assert any(n.startswith('mask2former_dinat-large-k11') and n.endswith(task) for n in names)


@pytest.mark.parametrize('path', CONFIGS, ids=CONFIG_IDS)
def test_config_follows_the_published_recipe_and_builds(path):
    recipe = recipe_of(path)
    cfg = load(path)
    backbone_cfg = cfg.model.backbone
    assert backbone_cfg.type == {'nat': 'NAT', 'dinat': 'DiNAT'}[recipe['family']]
    assert backbone_cfg.arch == recipe['arch']
    assert backbone_cfg.kernel_size == recipe['kernel_size']
    assert backbone_cfg.drop_path_rate == pytest.approx(recipe['drop_path'])
    assert backbone_cfg.init_cfg == dict(
        type='Pretrained', checkpoint=f'checkpoints/{recipe["checkpoint"]}'
    )
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(recipe['lr'])
    assert (cfg.optim_wrapper.type == 'AmpOptimWrapper') == recipe['amp']
    assert ('amp-' in path.name) == recipe['amp']  # named as mmdet / mmseg name AMP configs
    if recipe['amp']:
        # Upstream's Fp16OptimizerHook default: a static scale of 512 (a float: not 'dynamic').
        assert cfg.optim_wrapper.loss_scale == 512.0
        assert isinstance(cfg.optim_wrapper.loss_scale, float)
    else:
        assert 'loss_scale' not in cfg.optim_wrapper
    assert 'nat_mm' in cfg.custom_imports['imports']

    # The whole model, on the meta device (no memory, no init): the backbone's declared
    # contract, the heads' input channels and the published backbone structure.
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    backbone = model.backbone
    channels = CHANNELS[recipe['arch']]
    assert tuple(backbone.out_channels) == tuple(channels * 2**i for i in range(4))
    assert tuple(backbone.strides) == (4, 8, 16, 32)
    for key in heads_fed_by_backbone(cfg):
        assert list(cfg.model[key].in_channels) == list(backbone.out_channels), key
    if 'auxiliary_head' in cfg.model:
        aux = cfg.model.auxiliary_head
        assert aux.in_channels == backbone.out_channels[aux.in_index]
    parameter_names = {name for name, _ in backbone.named_parameters()}
    has_layer_scale = 'levels.0.blocks.0.gamma1' in parameter_names
    assert has_layer_scale == ((recipe['family'], recipe['arch']) in LAYER_SCALE)
    assert 'levels.0.blocks.0.attn.rpb' in parameter_names
    dilations = [list(stage) for stage in backbone.dilations]
    depths = tuple(len(stage) for stage in dilations)
    if recipe['family'] == 'dinat':
        assert dilations == expected_dilations(recipe, depths)
    else:
        assert all(d == 1 for stage in dilations for d in stage)


# --- one config per head family ------------------------------------------------------------------
FAMILIES = {
    'mask-rcnn': 'mmdet/nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py',
    'cascade': 'mmdet/dinat/cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    'upernet': 'mmseg/dinat/dinat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py',
    'mask2former-panoptic': 'mmdet/nat/mask2former_nat-tiny_8xb2-lsj-50e_coco-panoptic.py',
    'mask2former-instance': 'mmdet/dinat/mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco.py',
    'mask2former-semantic': (
        'mmseg/dinat/mask2former_dinat-large-k11-in22k_8xb2-160k_ade20k-640x640.py'
    ),
}
IMAGE_SIZE = 64


def family_config(family: str) -> Path:
    return ROOT / 'configs' / FAMILIES[family]


def det_batch(with_semantic: bool) -> dict:
    from mmdet.testing import demo_mm_inputs

    return demo_mm_inputs(
        batch_size=1,
        image_shapes=[(3, IMAGE_SIZE, IMAGE_SIZE)],
        num_items=[3],
        num_classes=80,
        with_mask=True,
        with_semantic=with_semantic,
    )


def seg_batch(num_classes: int) -> dict:
    """Two images (UPerNet's pooling branch has BatchNorm on 1x1 maps: batch 1 cannot train)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    generator = torch.Generator().manual_seed(0)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    batch = dict(inputs=[], data_samples=[])
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size))
        labels = torch.randint(0, num_classes, (1, *size), generator=generator)
        labels[:, :8] = 255  # an ignored band, as padding would give
        sample.gt_sem_seg = PixelData(data=labels)
        batch['inputs'].append(
            torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
        )
        batch['data_samples'].append(sample)
    return batch


def batch_for(family: str) -> dict:
    if family in ('upernet', 'mask2former-semantic'):
        return seg_batch(num_classes=150)
    return det_batch(with_semantic=family == 'mask2former-panoptic')


def check_predictions(family: str, predictions: list, batch_size: int) -> None:
    assert len(predictions) == batch_size
    sample = predictions[0]
    size = (IMAGE_SIZE, IMAGE_SIZE)
    if family in ('upernet', 'mask2former-semantic'):
        assert sample.pred_sem_seg.data.shape == (1, *size)
        assert sample.seg_logits.data.shape == (150, *size)
        assert torch.isfinite(sample.seg_logits.data).all()
        return
    if family == 'mask2former-panoptic':
        assert sample.pred_panoptic_seg.sem_seg.shape == (1, *size)
    instances = sample.pred_instances
    count = len(instances)
    assert instances.bboxes.shape == (count, 4)
    assert instances.scores.shape == instances.labels.shape == (count,)
    assert tuple(instances.masks.shape) == (count, *size)
    assert torch.isfinite(instances.scores).all()


# The heaviest step tests (~30-40 s each on 2 busy cores) run with `-m slow`.
SLOW_STEP_FAMILIES = ('cascade', 'mask2former-instance', 'mask2former-semantic')


@pytest.mark.parametrize(
    'family',
    [
        pytest.param(family, marks=pytest.mark.slow) if family in SLOW_STEP_FAMILIES else family
        for family in FAMILIES
    ],
)
def test_one_train_step_and_one_predict_step_on_cpu(family):
    torch.set_num_threads(2)
    cfg = load_small(family_config(family), IMAGE_SIZE)
    model = build_model(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    watched = model.backbone.levels[0].blocks[0].attn.qkv.weight
    before = watched.detach().clone()

    model.train()
    log_vars = model.train_step(batch_for(family), optim_wrapper)
    assert torch.isfinite(torch.as_tensor(log_vars['loss']))
    assert log_vars['loss'] > 0
    assert not torch.equal(before, watched.detach()), 'the optimizer step left the backbone as is'

    model.eval()
    batch = batch_for(family)
    with torch.no_grad():
        check_predictions(family, model.test_step(batch), len(batch['inputs']))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_norms_get_no_weight_decay_rpb_as_published(family):
    cfg = load_small(family_config(family), IMAGE_SIZE)
    model = build_model(cfg)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    base_lr, base_wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    group_of = {id(p): group for group in optimizer.param_groups for p in group['params']}
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()
    }
    backbone_lr_mult = 0.1 if family.startswith('mask2former') else 1.0
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        owner = name.split('.')[-2]
        in_backbone = name.startswith('backbone.')
        if in_backbone:
            assert group['lr'] == pytest.approx(base_lr * backbone_lr_mult), name
        if name.endswith('.rpb'):
            rpb_decay = base_wd if recipe_of(family_config(family))['rpb_decay'] else 0.0
            assert group['weight_decay'] == pytest.approx(rpb_decay), name
        elif id(param) in norm_params and in_backbone:
            assert group['weight_decay'] == 0.0, name
        elif id(param) in norm_params:
            # Heads: mmdet/mmseg's own rule (NAT's `norm` key for the detection and UPerNet
            # recipes, as published; every norm for Mask2Former).
            expect_zero = family.startswith('mask2former') or 'norm' in name
            assert (group['weight_decay'] == 0.0) == expect_zero, name
        elif in_backbone or 'norm' not in owner:
            embeddings = ('query_embed', 'query_feat', 'level_embed')
            if not any(key in name for key in embeddings):
                assert group['weight_decay'] == pytest.approx(base_wd), name
