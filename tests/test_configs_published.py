"""The published recipes' details that the host configs do differently, on the resolved configs.

Multi-scale test sizes, Mask2Former's optimizer, evaluation, batch and crop. Expected values are
computed here from the upstream tools' rules (mmseg 0.x ``MultiScaleFlipAug`` + ``Resize``,
detectron2's ``ResizeShortestEdge``; docs/original-models.md), not read from the configs.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from PIL import Image

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmsegmentation is not installed')

import nat_mm.models
import nat_mm.optim  # noqa: F401
from nat_mm.apis.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
UPERNET = sorted((CONFIGS / 'mmseg').rglob('*_upernet_*.py'))
M2F_ADE20K = CONFIGS / 'mmseg/dinat/mask2former_dinat-large-k11-in22k_8xb2-160k_ade20k-640x640.py'
M2F_COCO = {
    task: CONFIGS / f'mmdet/dinat/mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_{task}.py'
    for task in ('coco-panoptic', 'coco')
}
IMAGE_SIZES = [(640, 480), (2000, 300)]  # (w, h): one fitted by its short side, one by its long


def load(path: Path) -> Config:
    cfg = Config.fromfile(str(path))
    init_default_scope(cfg.default_scope)
    return cfg


# --- multi-scale test -----------------------------------------------------------------------------
def mmseg0_aug_test_size(w: int, h: int, ratio: float) -> tuple[int, int]:
    """mmseg 0.x ``--aug-test``: img_scale (2048, 512) x ratio, then Resize(keep_ratio=True)."""
    long_max, short_max = int(2048 * ratio), int(512 * ratio)
    factor = min(long_max / max(w, h), short_max / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def detectron2_shortest_edge_size(w: int, h: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape`` (Mask2Former's TEST.AUG)."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_w + 0.5), int(new_h + 0.5)


def tta_views(cfg: Config, tmp_path: Path, w: int, h: int) -> list[tuple[tuple[int, int], bool]]:
    """((w, h), flipped) of every view the config's tta_pipeline makes of a w x h image."""
    from mmcv.transforms import Compose

    image, label = tmp_path / f'{w}x{h}.jpg', tmp_path / f'{w}x{h}.png'
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(image)
    Image.fromarray(np.ones((h, w), np.uint8)).save(label)
    results = dict(img_path=str(image), seg_map_path=str(label), reduce_zero_label=True)
    results.update(seg_fields=[])
    out = Compose(cfg.tta_pipeline)(results)
    views = []
    for inputs, sample in zip(out['inputs'], out['data_samples'], strict=True):
        assert tuple(inputs.shape[1:]) == sample.img_shape
        views.append(((sample.img_shape[1], sample.img_shape[0]), sample.flip))
    return views


@pytest.mark.parametrize('size', IMAGE_SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_upernet_tta_gives_the_mmseg_0x_aug_test_sizes(tmp_path, size):
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    expected = [(mmseg0_aug_test_size(*size, r), flip) for r in ratios for flip in (False, True)]
    cfg = load(UPERNET[0])
    assert tta_views(cfg, tmp_path, *size) == expected
    # Not what mmseg 1.x's own tta_pipeline gives (the original image rescaled by r).
    assert [view for view, _ in expected[::2]] != [
        (int(size[0] * r + 0.5), int(size[1] * r + 0.5)) for r in ratios
    ]
    for path in UPERNET[1:]:  # every UPerNet config (all sizes, DiNAT-L too) inherits it
        assert load(path).tta_pipeline == cfg.tta_pipeline, path.name
    assert cfg.tta_model.type == 'SegTTAModel'


@pytest.mark.parametrize('size', IMAGE_SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_mask2former_ade20k_tta_gives_detectron2s_sizes(tmp_path, size):
    # Upstream TEST.AUG: MIN_SIZES 320..1120, MAX_SIZE 4480, FLIP True.
    shorts = (320, 480, 640, 800, 960, 1120)
    expected = [
        (detectron2_shortest_edge_size(*size, short, 4480), flip)
        for short in shorts
        for flip in (False, True)
    ]
    assert tta_views(load(M2F_ADE20K), tmp_path, *size) == expected


# --- Mask2Former ------------------------------------------------------------------------------
def test_mask2former_ade20k_crop_has_no_single_category_limit():
    # Upstream INPUT.CROP.SINGLE_CATEGORY_MAX_AREA: 1.0 (mmseg's cat_max_ratio default).
    from mmseg.registry import TRANSFORMS

    cfg = load(M2F_ADE20K)
    (crop,) = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop']
    assert crop.crop_size == (640, 640)
    assert TRANSFORMS.build(crop).cat_max_ratio == 1.0


@pytest.mark.parametrize('path', [M2F_ADE20K, *M2F_COCO.values()], ids=lambda p: p.stem)
def test_mask2former_dinat_large_decays_rpb_but_not_norms(path):
    cfg = load(path)
    with torch.device('meta'):  # the full DiNAT-L model, without memory
        model = MODELS.build(cfg.model)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    named = dict(model.named_parameters())
    rpb = [n for n in named if n.endswith('.attn.rpb')]
    assert len(rpb) == 3 + 4 + 18 + 5
    for name in rpb:
        assert group_of[id(named[name])]['weight_decay'] == pytest.approx(0.05), name
        assert group_of[id(named[name])]['lr'] == pytest.approx(1e-5), name  # backbone x0.1
    norms = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm)
    ]
    assert any(n.startswith('backbone.') for n in norms)
    for module_name in norms:
        for param in model.get_submodule(module_name).parameters(recurse=False):
            assert group_of[id(param)]['weight_decay'] == 0.0, module_name
    qkv = named['backbone.levels.2.blocks.0.attn.qkv.weight']
    assert group_of[id(qkv)]['weight_decay'] == pytest.approx(0.05)


def test_mask2former_coco_panoptic_evaluates_what_mmdet_can():
    cfg = load(M2F_COCO['coco-panoptic'])
    test_cfg = cfg.model.test_cfg
    assert test_cfg.panoptic_on and test_cfg.instance_on
    assert not test_cfg.semantic_on  # see test_mmdet_mask2former_has_no_semantic_output
    metrics = {metric.type: metric for metric in cfg.test_evaluator}
    assert set(metrics) == {'CocoPanopticMetric', 'CocoMetric'}  # PQ; box and mask AP
    assert 'segm' in metrics['CocoMetric'].metric


def test_mmdet_mask2former_has_no_semantic_output():
    # Why the config cannot report upstream's semantic mIoU (68.3): mmdet 3.3 asserts it away.
    # If this fails, mmdet learnt semantic outputs: enable semantic_on and mmdet's SemSegMetric.
    from mmdet.models.seg_heads.panoptic_fusion_heads import MaskFormerFusionHead
    from mmdet.structures import DetDataSample

    head = MaskFormerFusionHead(
        num_things_classes=2, num_stuff_classes=1, test_cfg=dict(semantic_on=True)
    )
    sample = DetDataSample(metainfo=dict(img_shape=(8, 8), ori_shape=(8, 8)))
    with pytest.raises(AssertionError, match='not supported'):
        head.predict(torch.zeros(1, 5, 4), torch.zeros(1, 5, 8, 8), [sample])


@pytest.mark.parametrize('task', list(M2F_COCO))
def test_mask2former_coco_batch_is_16_on_8_gpus(task):
    cfg = load(M2F_COCO[task])
    assert '_8xb2-' in M2F_COCO[task].name
    assert cfg.train_dataloader.batch_size * 8 == 16 == cfg.auto_scale_lr.base_batch_size
    assert cfg.auto_scale_lr.enable is False  # on with --auto-scale-lr, as in mmdet


# --- AMP on a CPU ---------------------------------------------------------------------------------
def test_fp32_override_drops_the_amp_loss_scale():
    path = CONFIGS / 'mmdet/nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py'
    assert load_config(path).optim_wrapper.loss_scale == 512.0
    cfg = load_config(path, {'optim_wrapper.type': 'OptimWrapper'})
    assert 'loss_scale' not in cfg.optim_wrapper
    wrapper = build_optim_wrapper(torch.nn.Linear(2, 2), cfg.optim_wrapper)
    assert type(wrapper).__name__ == 'OptimWrapper'
