"""Upstream trained checkpoints (the NAT repo's Mask R-CNN / Cascade Mask R-CNN of mmdet 2.19 and
UPerNet of mmseg 0.20.2, written by mmcv-full 1.4.8 on torch 1.11) in mmdet 3.3 / mmseg 1.2.

The upstream files are synthesised here, independently of the models under test: the state dict
from the names and shapes of the upstream modules (:func:`upstream_shapes`, written from mmdet
2.19's ``FPN``, ``RPNHead``, ``Shared2FCBBoxHead`` / ``ConvFCBBoxHead``, ``FCNMaskHead``,
``CascadeRoIHead``, mmseg 0.20.2's ``UPerHead``, ``FCNHead``, mmcv 1.4's ``ConvModule`` and the
NAT repo's ``detection/nat.py`` / ``dinats.py`` with NATTEN 0.14's ``NeighborhoodAttention2D``),
the file as mmcv 1.4.8's ``save_checkpoint`` writes it (:func:`mmcv1_checkpoint`: the state dict
as an OrderedDict with ``_metadata``, ``meta`` with versions, time, config text, env_info,
``CLASSES`` / ``PALETTE``, epoch / iter, ``hook_msgs``, the fp16 loss scaler, and AdamW's
state on ``cuda:0``). docs/checkpoints.md section 6 has the sources.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmsegmentation is not installed')

from nat_mm.apis import build_model, init_inferencer, load_config
from nat_mm.apis.main_job import det_overrides
from nat_mm.checkpoint import (
    convert_model_state_dict,
    dataset_meta_from,
    load_checkpoint,
    load_model_checkpoint,
    strict,
    to_host_checkpoint,
)
from nat_mm.checkpoint.model_layouts import host_of_model
from nat_mm.errors import NatMMError

ROOT = Path(__file__).resolve().parents[1]
COCO_CLASSES_HEAD = ('person', 'bicycle', 'car')  # a file's CLASSES start (the test sizes)


# ----------------------------------------------------------------------------- upstream layout
@dataclass(frozen=True)
class Backbone:
    """An upstream backbone: NAT / DiNAT (``detection/nat.py``, ``dinat.py``: ``levels``) or
    DiNAT_s (``dinats.py``: Swin's ``layers``, 4x4 patch stem, ``PatchMerging``)."""

    swin_layout: bool
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: float
    layer_scale: bool = False
    kernel: int = 7

    @property
    def channels(self) -> list[int]:
        return [self.embed_dim * 2**stage for stage in range(len(self.depths))]


@dataclass(frozen=True)
class DetHeads:
    """mmdet 2.19 Mask R-CNN (``Shared2FCBBoxHead``) or Cascade Mask R-CNN (3 stages of
    ``ConvFCBBoxHead`` with 4 shared convs + SyncBN, 1 fc), FPN, RPN, ``FCNMaskHead``."""

    cascade: bool
    neck: int = 256
    fc: int = 1024
    mask_convs: int = 4
    num_classes: int = 80
    roi_size: int = 7
    anchors: int = 3  # scales [8] x ratios [0.5, 1, 2]


@dataclass(frozen=True)
class SegHeads:
    """mmseg 0.20.2 ``UPerHead`` (pool scales 1, 2, 3, 6) + ``FCNHead`` on stage 2, SyncBN."""

    channels: int = 512
    aux_channels: int = 256
    num_classes: int = 150
    pool_scales: int = 4


Shapes = dict[str, tuple[int, ...]]


def layer(shapes: Shapes, name: str, weight: tuple[int, ...], bias: int | None = None) -> None:
    """A module with ``weight`` (and a ``bias`` of that many channels)."""
    shapes[f'{name}.weight'] = weight
    if bias is not None:
        shapes[f'{name}.bias'] = (bias,)


def layer_norm(shapes: Shapes, name: str, channels: int) -> None:
    layer(shapes, name, (channels,), channels)


def conv_module(shapes: Shapes, name: str, out_ch: int, in_ch: int, k: int, norm: bool) -> None:
    """mmcv's ``ConvModule``: ``conv`` (no bias before a norm), then ``bn`` (BN / SyncBN)."""
    layer(shapes, f'{name}.conv', (out_ch, in_ch, k, k), None if norm else out_ch)
    if norm:
        for param in ('weight', 'bias', 'running_mean', 'running_var'):
            shapes[f'{name}.bn.{param}'] = (out_ch,)
        shapes[f'{name}.bn.num_batches_tracked'] = ()


def backbone_shapes(b: Backbone) -> Shapes:
    """``backbone.*`` in mmcv's ``get_state_dict`` order (a module's own parameters, then its
    children in registration order)."""
    shapes: Shapes = {}
    c = b.embed_dim
    if b.swin_layout:  # PatchEmbed: Conv2d(3, C, 4, stride 4)
        layer(shapes, 'patch_embed.proj', (c, 3, 4, 4), c)
    else:  # ConvTokenizer: two 3x3 stride-2 convs
        layer(shapes, 'patch_embed.proj.0', (c // 2, 3, 3, 3), c // 2)
        layer(shapes, 'patch_embed.proj.1', (c, c // 2, 3, 3), c)
    layer_norm(shapes, 'patch_embed.norm', c)
    stages = 'layers' if b.swin_layout else 'levels'
    for stage, (depth, heads) in enumerate(zip(b.depths, b.num_heads, strict=True)):
        dim, hidden = b.channels[stage], int(b.channels[stage] * b.mlp_ratio)
        for index in range(depth):
            name = f'{stages}.{stage}.blocks.{index}'
            if b.layer_scale:
                shapes[f'{name}.gamma1'] = shapes[f'{name}.gamma2'] = (dim,)
            layer_norm(shapes, f'{name}.norm1', dim)
            # NATTEN 0.14 NeighborhoodAttention2D: its own rpb, then qkv and proj.
            shapes[f'{name}.attn.rpb'] = (heads, 2 * b.kernel - 1, 2 * b.kernel - 1)
            layer(shapes, f'{name}.attn.qkv', (3 * dim, dim), 3 * dim)
            layer(shapes, f'{name}.attn.proj', (dim, dim), dim)
            layer_norm(shapes, f'{name}.norm2', dim)
            layer(shapes, f'{name}.mlp.fc1', (hidden, dim), hidden)
            layer(shapes, f'{name}.mlp.fc2', (dim, hidden), dim)
        if stage < len(b.depths) - 1:
            down = f'{stages}.{stage}.downsample'
            if b.swin_layout:  # PatchMerging: Linear(4C, 2C, bias=False), LayerNorm(4C)
                layer(shapes, f'{down}.reduction', (2 * dim, 4 * dim))
                layer_norm(shapes, f'{down}.norm', 4 * dim)
            else:  # ConvDownsampler: Conv2d(C, 2C, 3, stride 2, bias=False), LayerNorm(2C)
                layer(shapes, f'{down}.reduction', (2 * dim, dim, 3, 3))
                layer_norm(shapes, f'{down}.norm', 2 * dim)
    for stage, dim in enumerate(b.channels):
        layer_norm(shapes, f'norm{stage}', dim)
    return {f'backbone.{key}': shape for key, shape in shapes.items()}


def detector_shapes(b: Backbone, h: DetHeads) -> Shapes:
    """``TwoStageDetector``: backbone, neck, rpn_head, roi_head."""
    shapes = backbone_shapes(b)
    n = h.neck
    for level, in_ch in enumerate(b.channels):  # FPN, num_outs 5 without extra convs
        conv_module(shapes, f'neck.lateral_convs.{level}', n, in_ch, 1, False)
    for level in range(len(b.channels)):
        conv_module(shapes, f'neck.fpn_convs.{level}', n, n, 3, False)
    layer(shapes, 'rpn_head.rpn_conv', (n, n, 3, 3), n)
    layer(shapes, 'rpn_head.rpn_cls', (h.anchors, n, 1, 1), h.anchors)  # sigmoid: 1 per anchor
    layer(shapes, 'rpn_head.rpn_reg', (4 * h.anchors, n, 1, 1), 4 * h.anchors)
    stages = [f'.{stage}' for stage in range(3)] if h.cascade else ['']
    for stage in stages:
        head = f'roi_head.bbox_head{stage}'
        # BBoxHead: fc_cls has num_classes + 1 rows, background last; class-specific regression.
        layer(shapes, f'{head}.fc_cls', (h.num_classes + 1, h.fc), h.num_classes + 1)
        layer(shapes, f'{head}.fc_reg', (4 * h.num_classes, h.fc), 4 * h.num_classes)
        if h.cascade:  # 4conv1fc with SyncBN
            for conv in range(4):
                conv_module(shapes, f'{head}.shared_convs.{conv}', n, n, 3, True)
        fc_inputs = [n * h.roi_size**2] + ([] if h.cascade else [h.fc])  # 1 or 2 shared fcs
        for fc, in_f in enumerate(fc_inputs):
            layer(shapes, f'{head}.shared_fcs.{fc}', (h.fc, in_f), h.fc)
    for stage in stages:
        head = f'roi_head.mask_head{stage}'
        for conv in range(h.mask_convs):
            conv_module(shapes, f'{head}.convs.{conv}', n, n, 3, False)
        layer(shapes, f'{head}.upsample', (n, n, 2, 2), n)  # ConvTranspose2d: [in, out, k, k]
        layer(shapes, f'{head}.conv_logits', (h.num_classes, n, 1, 1), h.num_classes)
    return shapes


def segmentor_shapes(b: Backbone, h: SegHeads) -> Shapes:
    """``EncoderDecoder``: backbone, decode_head (UPerHead), auxiliary_head (FCNHead)."""
    shapes = backbone_shapes(b)
    top, ch, levels = b.channels[-1], h.channels, len(b.channels)
    # BaseDecodeHead registers conv_seg first.
    layer(shapes, 'decode_head.conv_seg', (h.num_classes, ch, 1, 1), h.num_classes)
    for scale in range(h.pool_scales):  # PPM: Sequential(AdaptiveAvgPool2d, ConvModule)
        conv_module(shapes, f'decode_head.psp_modules.{scale}.1', ch, top, 1, True)
    conv_module(shapes, 'decode_head.bottleneck', ch, top + h.pool_scales * ch, 3, True)
    for level, in_ch in enumerate(b.channels[:-1]):
        conv_module(shapes, f'decode_head.lateral_convs.{level}', ch, in_ch, 1, True)
    for level in range(levels - 1):
        conv_module(shapes, f'decode_head.fpn_convs.{level}', ch, ch, 3, True)
    conv_module(shapes, 'decode_head.fpn_bottleneck', ch, levels * ch, 3, True)
    aux = h.aux_channels
    layer(shapes, 'auxiliary_head.conv_seg', (h.num_classes, aux, 1, 1), h.num_classes)
    conv_module(shapes, 'auxiliary_head.convs.0', aux, b.channels[2], 3, True)
    return shapes


def random_weights(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-trivial values: norms' scales near 1, positive running variances, fan-in scaled
    weights, ``num_batches_tracked`` int64 as torch keeps it."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            weights[key] = torch.tensor(1000)
        elif key.endswith('running_var'):
            weights[key] = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) == 1 and key.endswith('.weight'):
            weights[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 100
            weights[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return weights


# ----------------------------------------------------------------------------- the upstream file
ADE_PALETTE_HEAD = [[120, 120, 120], [180, 120, 120], [6, 230, 230]]


def upstream_meta(library: str, classes: tuple[str, ...], config: str) -> dict:
    """The ``meta`` of an mmcv 1.4.8 checkpoint of the NAT repo's ``train.py``: the runner's meta
    (env_info, config, seed, exp_name, hook_msgs, fp16 loss scaler), the CheckpointHook's
    (library version, CLASSES; mmseg also config and PALETTE), save_checkpoint's (mmcv_version,
    time, CLASSES), the runner's epoch / iter."""
    meta = {
        'env_info': 'sys.platform: linux\nPython: 3.8.13\nPyTorch: 1.11.0+cu113\nMMCV: 1.4.8',
        'config': config,
        'seed': 1234,
        'exp_name': 'x_3x_coco.py' if library == 'mmdet' else 'x_160k_ade20k.py',
        'hook_msgs': {'last_ckpt': '/work_dirs/x/latest.pth'},
        'fp16': {
            'loss_scaler': {
                'scale': 512.0,
                'growth_factor': 2.0,
                'backoff_factor': 0.5,
                'growth_interval': 2000,
                '_growth_tracker': 0,
            }
        },
        'mmcv_version': '1.4.8',
        'time': 'Tue Jul 12 08:36:02 2022',
        'CLASSES': classes,
    }
    if library == 'mmdet':
        meta.update(mmdet_version='2.19.0', epoch=36, iter=263000)
    else:
        palette = [ADE_PALETTE_HEAD[i % 3] for i in range(len(classes))]
        meta.update(mmseg_version='0.20.2+unknown', PALETTE=palette, epoch=17, iter=160000)
    return meta


@contextlib.contextmanager
def saved_on_cuda(tensors: list[torch.Tensor]):
    """``torch.save`` records these tensors' storages at 'cuda:0', as a GPU run writes an
    optimizer's state (mmcv moves the weights to the CPU, not the optimizer)."""
    marked = {tensor.untyped_storage().data_ptr() for tensor in tensors}

    def tagger(storage):
        return 'cuda:0' if storage.data_ptr() in marked else None

    torch.serialization.register_package(0, tagger, lambda storage, location: None)
    try:
        yield
    finally:
        registry = torch.serialization._package_registry
        registry[:] = [entry for entry in registry if entry[1] is not tagger]


def mmcv1_checkpoint(weights: dict[str, torch.Tensor], meta: dict) -> dict:
    """``{'meta', 'state_dict', 'optimizer'}`` as mmcv 1.4.8's ``save_checkpoint`` builds it."""
    state_dict = OrderedDict(weights)
    modules = {''} | {key.rsplit('.', 1)[0] for key in weights}
    state_dict._metadata = OrderedDict(
        (module, {'version': 2 if module.endswith('.bn') else 1}) for module in sorted(modules)
    )
    params = [
        key
        for key in weights
        if not key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
    ]
    optimizer = {  # torch 1.11 AdamW, one group per parameter (paramwise_cfg custom keys)
        'state': {
            i: {
                'step': 263000,
                'exp_avg': torch.zeros_like(weights[k]),
                'exp_avg_sq': torch.zeros_like(weights[k]),
            }
            for i, k in enumerate(params)
        },
        'param_groups': [
            {
                'lr': 1e-6,
                'betas': (0.9, 0.999),
                'eps': 1e-08,
                'amsgrad': False,
                'maximize': False,
                'weight_decay': 0.0 if 'norm' in k or 'rpb' in k else 0.05,
                'initial_lr': 1e-4,
                'params': [i],
            }
            for i, k in enumerate(params)
        ],
    }
    return {'meta': meta, 'state_dict': state_dict, 'optimizer': optimizer}


def write_upstream_file(path: Path, checkpoint: dict) -> Path:
    """Written as mmcv 1.4.8 writes it: ``torch.save`` into a BytesIO (protocol 2, zip)."""
    state = [
        t
        for entry in checkpoint['optimizer']['state'].values()
        for t in entry.values()
        if isinstance(t, torch.Tensor)
    ]
    buffer = io.BytesIO()
    with saved_on_cuda(state):
        torch.save(checkpoint, buffer)
    path.write_bytes(buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- published configs
# The NAT repo's detection/configs/*/ and segmentation/configs/*/ model configs.
UPSTREAM_CONFIGS = [
    *(
        f'mask_rcnn_{family}_{arch}_3x_coco'
        for family in ('nat', 'dinat')
        for arch in ('mini', 'tiny', 'small')
    ),
    *(f'cascade_mask_rcnn_nat_{arch}_3x_coco' for arch in ('mini', 'tiny', 'small', 'base')),
    *(
        f'cascade_mask_rcnn_dinat_{arch}_3x_coco'
        for arch in ('mini', 'tiny', 'small', 'base', 'large')
    ),
    *(f'mask_rcnn_dinat_s_{arch}_3x_coco' for arch in ('tiny', 'small')),
    *(f'cascade_mask_rcnn_dinat_s_{arch}_3x_coco' for arch in ('tiny', 'small', 'base', 'large')),
    *(
        f'upernet_{family}_{arch}_512x512_160k_ade20k'
        for family in ('nat', 'dinat')
        for arch in ('mini', 'tiny', 'small', 'base')
    ),
    'upernet_dinat_large_640x640_160k_ade20k',
    *(f'upernet_dinat_s_{arch}_512x512_160k_ade20k' for arch in ('tiny', 'small', 'base')),
    'upernet_dinat_s_large_640x640_160k_ade20k',
]
# The published structures (docs/original-models.md sections 2 and 5).
NAT_ARCHS = {
    'mini': (64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0),
    'tiny': (64, (3, 4, 18, 5), (2, 4, 8, 16), 3.0),
    'small': (96, (3, 4, 18, 5), (3, 6, 12, 24), 2.0),
    'base': (128, (3, 4, 18, 5), (4, 8, 16, 32), 2.0),
    'large': (192, (3, 4, 18, 5), (6, 12, 24, 48), 2.0),
}
DINATS_ARCHS = {
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24), 4.0),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24), 4.0),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32), 4.0),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48), 4.0),
}
LAYER_SCALE = {('nat', 'small'), ('nat', 'base'), ('dinat', 'base')}
UPSTREAM_NAME = re.compile(r'(cascade_mask_rcnn|mask_rcnn|upernet)_(dinat_s|dinat|nat)_([a-z]+)_')


def published(name: str) -> tuple[Path, Shapes]:
    """Our config of an upstream config name, and the upstream file's shapes."""
    head, family, arch = UPSTREAM_NAME.match(name).groups()
    swin_layout = family == 'dinat_s'
    archs = DINATS_ARCHS if swin_layout else NAT_ARCHS
    backbone = Backbone(swin_layout, *archs[arch], layer_scale=(family, arch) in LAYER_SCALE)
    ours = {'dinat_s': 'dinats'}.get(family, family)
    if head == 'upernet':
        pattern = f'mmseg/{family}/{ours}-{arch}-*_upernet_*.py'
        shapes = segmentor_shapes(backbone, SegHeads())
    else:
        pattern = f'mmdet/{family}/{head.replace("_", "-")}_{ours}-{arch}_fpn_*3x_coco.py'
        shapes = detector_shapes(backbone, DetHeads(cascade=head.startswith('cascade')))
    (path,) = sorted((ROOT / 'configs').glob(pattern))
    return path, shapes


def meta_model(cfg: Config) -> torch.nn.Module:
    """The config's model on the meta device (names and shapes, no memory, no init)."""
    from mmengine.registry import MODELS, DefaultScope

    from nat_mm.apis.config import register_library

    register_library(cfg.default_scope)
    with DefaultScope.overwrite_default_scope(cfg.default_scope), torch.device('meta'):
        return MODELS.build(cfg.model)


# One per head and backbone family by default; the rest (a second each) with -m slow.
DEFAULT_PUBLISHED = {
    'mask_rcnn_nat_small_3x_coco',  # layer scale
    'cascade_mask_rcnn_dinat_large_3x_coco',
    'upernet_dinat_s_large_640x640_160k_ade20k',
}


@pytest.mark.parametrize(
    'name',
    [
        n if n in DEFAULT_PUBLISHED else pytest.param(n, marks=pytest.mark.slow)
        for n in UPSTREAM_CONFIGS
    ],
)
def test_every_published_upstream_model_has_our_configs_keys_shapes_and_order(name):
    path, upstream = published(name)
    model = meta_model(load_config(path, {'model.backbone.init_cfg': None}))
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(ours.items()) == list(upstream.items())
    meta_weights = {key: torch.empty(shape, device='meta') for key, shape in upstream.items()}
    state_dict, layout = convert_model_state_dict(meta_weights, model_host(path))
    assert layout in ('mmdet3', 'mmseg1') and list(state_dict) == list(upstream)


def model_host(path: Path) -> str:
    return path.relative_to(ROOT / 'configs').parts[0]


# ----------------------------------------------------------------------------- shrunk models
SMALL_BACKBONES = {
    'nat': Backbone(False, 32, (1, 1, 1, 1), (1, 2, 4, 8), 2.0, layer_scale=True),
    'dinat': Backbone(False, 32, (1, 1, 1, 1), (1, 2, 4, 8), 2.0),
    'dinats': Backbone(True, 32, (1, 1, 1, 1), (1, 2, 4, 8), 2.0),
}
SMALL_DET, SMALL_SEG = (
    DetHeads(cascade=False, neck=32, fc=64),
    SegHeads(channels=32, aux_channels=16),
)
CONFIGS = {
    ('mask-rcnn', 'nat'): 'mmdet/nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py',
    ('mask-rcnn', 'dinat'): 'mmdet/dinat/mask-rcnn_dinat-tiny_fpn_amp-ms-crop-3x_coco.py',
    ('mask-rcnn', 'dinats'): 'mmdet/dinat_s/mask-rcnn_dinats-tiny_fpn_amp-ms-crop-3x_coco.py',
    (
        'cascade',
        'nat',
    ): 'mmdet/nat/cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    (
        'cascade',
        'dinat',
    ): 'mmdet/dinat/cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    (
        'cascade',
        'dinats',
    ): 'mmdet/dinat_s/cascade-mask-rcnn_dinats-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    ('upernet', 'nat'): 'mmseg/nat/nat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py',
    ('upernet', 'dinat'): 'mmseg/dinat/dinat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py',
    (
        'upernet',
        'dinats',
    ): 'mmseg/dinat_s/dinats-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py',
}


def small_options(head: str, family: str) -> dict:
    """``--cfg-options`` giving our config the sizes of :data:`SMALL_BACKBONES` / heads."""
    b = SMALL_BACKBONES[family]
    options = {
        'model.backbone.arch': None,
        'model.backbone.embed_dim': b.embed_dim,
        'model.backbone.depths': list(b.depths),
        'model.backbone.num_heads': list(b.num_heads),
        'model.backbone.mlp_ratio': b.mlp_ratio,
        'model.backbone.init_cfg': None,
        'optim_wrapper.type': 'OptimWrapper',
    }
    if family == 'nat':
        options['model.backbone.layer_scale'] = 1e-5
    else:
        options['model.backbone.dilations'] = [[1], [2], [1], [1]]
    if head == 'upernet':
        h = SMALL_SEG
        options.update(
            {
                'model.data_preprocessor.size': (64, 64),
                'model.decode_head.in_channels': b.channels,
                'model.decode_head.channels': h.channels,
                'model.auxiliary_head.in_channels': b.channels[2],
                'model.auxiliary_head.channels': h.aux_channels,
            }
        )
        return options
    h = SMALL_DET
    options.update(
        {
            'model.neck.in_channels': b.channels,
            'model.neck.out_channels': h.neck,
            'model.rpn_head.in_channels': h.neck,
            'model.rpn_head.feat_channels': h.neck,
            'model.roi_head.bbox_roi_extractor.out_channels': h.neck,
            'model.roi_head.mask_roi_extractor.out_channels': h.neck,
            'model.roi_head.mask_head.in_channels': h.neck,
            'model.roi_head.mask_head.conv_out_channels': h.neck,
            'model.test_cfg.rpn.max_per_img': 50,
        }
    )
    for stage in ('.0', '.1', '.2') if head == 'cascade' else ('',):
        options[f'model.roi_head.bbox_head{stage}.in_channels'] = h.neck
        options[f'model.roi_head.bbox_head{stage}.fc_out_channels'] = h.fc
        if head == 'cascade':
            options[f'model.roi_head.bbox_head{stage}.conv_out_channels'] = h.neck
    return options


@functools.cache
def small_model(head: str, family: str) -> torch.nn.Module:
    """Built once per module: every test that checks weights loads all of them first."""
    torch.manual_seed(0)
    return build_model(
        load_config(ROOT / 'configs' / CONFIGS[head, family], small_options(head, family))
    )


def small_upstream_weights(head: str, family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    b = SMALL_BACKBONES[family]
    if head == 'upernet':
        return random_weights(segmentor_shapes(b, SMALL_SEG), seed)
    return random_weights(detector_shapes(b, replace(SMALL_DET, cascade=head == 'cascade')), seed)


def tensor_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """The raw outputs (``mode='tensor'``) of a fixed 64x64 image, flattened."""
    from mmengine.structures import InstanceData

    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator)
    if host_of_model(model) == 'mmdet':
        from mmdet.structures import DetDataSample

        sample = DetDataSample(
            metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1.0, 1.0))
        )
        sample.gt_instances = InstanceData()
    else:
        from mmseg.structures import SegDataSample

        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor({'inputs': [image], 'data_samples': [sample]}, False)
        outputs = model(**data, mode='tensor')
    flat, todo = [], [outputs]
    while todo:
        item = todo.pop(0)
        if isinstance(item, torch.Tensor):
            flat.append(item)
        else:
            todo[:0] = list(item)
    return flat


EXPECTED_LOG = {
    'mmdet': "mmdet2 layout (mmdet 2.x (mmcv 1.x): the state dict has mmdet 3.x's keys and "
    'shapes), loaded into the mmdet model',
    'mmseg': "mmseg0 layout (mmseg 0.x (mmcv 1.x): the state dict has mmseg 1.x's keys and "
    'shapes), loaded into the mmseg model',
}
# The step-sized models: one per head and backbone family by default, the rest with -m slow.
DEFAULT_SMALL = {('mask-rcnn', 'nat'), ('cascade', 'dinat'), ('upernet', 'dinats')}


@pytest.mark.parametrize(
    ('head', 'family'),
    [
        pair if pair in DEFAULT_SMALL else pytest.param(*pair, marks=pytest.mark.slow)
        for pair in CONFIGS
    ],
)
def test_upstream_file_loads_strictly_with_the_outputs_of_the_weights_loaded_directly(
    head, family, tmp_path, monkeypatch
):
    weights = small_upstream_weights(head, family)
    library = 'mmseg' if head == 'upernet' else 'mmdet'
    classes = COCO_CLASSES_HEAD if library == 'mmdet' else ('wall', 'building', 'sky')
    meta = upstream_meta(library, classes, config='model = dict(...)')
    path = write_upstream_file(tmp_path / 'upstream.pth', mmcv1_checkpoint(weights, meta))

    model = small_model(head, family)
    assert host_of_model(model) == library
    model.load_state_dict(weights, strict=True)  # the same tensors, loaded directly
    expected = tensor_outputs(model)
    for param in model.parameters():
        param.data.zero_()
    logged = []
    monkeypatch.setattr(strict, 'print_log', lambda message, **_: logged.append(message))
    checkpoint = load_model_checkpoint(model, path)

    assert checkpoint['meta']['CLASSES'] == classes
    assert checkpoint['optimizer']['state'][0]['exp_avg'].device.type == 'cpu'
    loaded = model.state_dict()
    assert list(loaded) == list(weights)
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())
    outputs = tensor_outputs(model)
    # mmdet: class scores, box deltas, masks of the RoIs; mmseg: the class logits.
    assert len(outputs) == len(expected) == (3 if library == 'mmdet' else 1)
    assert all(output.numel() > 0 for output in outputs)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))
    assert logged == [f'checkpoint {path}: {EXPECTED_LOG[library]}']
    logged.clear()  # a file in the host's own layout loads without a word
    torch.save({'state_dict': weights, 'meta': {'dataset_meta': {'classes': classes}}}, path)
    load_model_checkpoint(model, path)
    assert logged == []


def test_the_upstream_file_needs_map_location_cpu_and_keeps_its_gpu_optimizer(tmp_path):
    weights = small_upstream_weights('mask-rcnn', 'nat')
    meta = upstream_meta('mmdet', COCO_CLASSES_HEAD, config='')
    path = write_upstream_file(tmp_path / 'upstream.pth', mmcv1_checkpoint(weights, meta))
    if not torch.cuda.is_available():  # the file really names cuda:0
        with pytest.raises(NatMMError, match='CUDA'):
            load_checkpoint(path, map_location=None)
    checkpoint = load_checkpoint(path)
    assert checkpoint['state_dict']._metadata['roi_head.bbox_head.fc_cls'] == {'version': 1}


def test_a_file_of_another_model_fails_listing_every_key_and_loads_nothing(tmp_path):
    mask_rcnn = small_upstream_weights('mask-rcnn', 'dinat')
    meta = upstream_meta('mmdet', COCO_CLASSES_HEAD, config='')
    path = write_upstream_file(tmp_path / 'mask_rcnn.pth', mmcv1_checkpoint(mask_rcnn, meta))
    cascade = small_model('cascade', 'dinat')
    before = {key: value.clone() for key, value in cascade.state_dict().items()}
    expected = cascade.state_dict()
    missing = sorted(set(expected) - set(mask_rcnn))
    unexpected = sorted(set(mask_rcnn) - set(expected))
    with pytest.raises(NatMMError) as error:
        load_model_checkpoint(cascade, path)
    message = str(error.value)
    assert f'{len(missing)} missing keys: {", ".join(missing)}' in message
    assert f'{len(unexpected)} unexpected keys: {", ".join(unexpected)}' in message
    assert 'roi_head.bbox_head.0.shared_convs.3.bn.running_var' in missing
    assert 'roi_head.bbox_head.shared_fcs.1.weight' in unexpected
    assert str(path) in message
    assert all(torch.equal(before[k], v) for k, v in cascade.state_dict().items())


def test_a_backbone_file_given_as_a_whole_model_lists_every_missing_key(tmp_path):
    backbone = {
        k.removeprefix('backbone.'): v
        for k, v in small_upstream_weights('upernet', 'dinats').items()
        if k.startswith('backbone.')
    }
    path = tmp_path / 'nat_imagenet.pth'
    torch.save(backbone, path)
    model = small_model('upernet', 'dinats')
    with pytest.raises(NatMMError) as error:
        load_model_checkpoint(model, path)
    count = len(model.state_dict())
    assert f'{count} missing keys: ' in str(error.value)
    assert f'{len(backbone)} unexpected keys: ' in str(error.value)


# ----------------------------------------------------------------------------- meta
def test_upstream_meta_becomes_dataset_meta():
    det = upstream_meta('mmdet', COCO_CLASSES_HEAD, config='x = 1')
    assert dataset_meta_from(det) == {'classes': COCO_CLASSES_HEAD}
    seg = upstream_meta('mmseg', ('wall', 'building', 'sky'), config='x = 1')
    assert dataset_meta_from(seg) == {
        'classes': ('wall', 'building', 'sky'),
        'palette': ADE_PALETTE_HEAD,
    }
    own = {'dataset_meta': {'classes': ('a',), 'palette': [[1, 2, 3]]}}  # mmengine's runner
    assert dataset_meta_from(own) == own['dataset_meta']
    assert dataset_meta_from({'dataset_meta': {'CLASSES': ('a',)}}) == {'classes': ('a',)}
    assert dataset_meta_from({'mmcv_version': '1.4.8'}) is None
    with pytest.raises(NatMMError, match=r'meta.CLASSES must be a list of class names'):
        dataset_meta_from({'CLASSES': 'person'})
    with pytest.raises(NatMMError, match=r'meta.PALETTE must hold one \[r, g, b\] of ints per'):
        dataset_meta_from({'CLASSES': ('a', 'b'), 'PALETTE': [[1, 2, 3]]})


def test_to_host_checkpoint_names_the_layout_and_keeps_provenance_not_training_state():
    weights = {'backbone.w': torch.zeros(1), 'decode_head.w': torch.ones(1)}
    meta = upstream_meta('mmseg', ('wall',), config='norm_cfg = dict(type="SyncBN")')
    host, layout = to_host_checkpoint(mmcv1_checkpoint(weights, meta), 'mmseg', 'x.pth')
    assert layout == 'mmseg0'
    assert set(host) == {'state_dict', 'meta'} and host['state_dict'] == weights
    assert host['meta']['dataset_meta'] == {'classes': ('wall',), 'palette': [[120, 120, 120]]}
    provenance = host['meta']['converted_from']
    assert provenance['layout'] == 'mmseg0' and provenance['mmcv_version'] == '1.4.8'
    assert provenance['config'] == meta['config'] and provenance['iter'] == 160000
    assert not {'hook_msgs', 'fp16', 'CLASSES', 'PALETTE'} & set(provenance)
    mmengine_file = {
        'meta': {'dataset_meta': {'classes': ('a',)}, 'iter': 3},
        'state_dict': weights,
    }
    host, layout = to_host_checkpoint(mmengine_file, 'mmseg')
    assert layout == 'mmseg1' and host['meta'] == mmengine_file['meta']
    assert to_host_checkpoint(weights, 'mmdet')[1] == 'mmdet3'  # a bare state dict
    # No mmcv_version (re-saved elsewhere): the host's layout, CLASSES still read.
    host, layout = to_host_checkpoint({'state_dict': weights, 'meta': {'CLASSES': ['a']}}, 'mmdet')
    assert layout == 'mmdet3' and host['meta']['dataset_meta'] == {'classes': ('a',)}
    with pytest.raises(NatMMError, match=r"host must be one of \('mmdet', 'mmseg'\)"):
        convert_model_state_dict(weights, 'mmpretrain')


def test_a_detectron2_mask2former_state_dict_goes_to_its_converter():
    detectron2 = pytest.importorskip(
        'nat_mm.checkpoint.detectron2', reason='the detectron2 converter is not written yet'
    )
    d2 = {
        'backbone.patch_embed.proj.0.weight': torch.zeros(2, 3, 3, 3),
        'sem_seg_head.predictor.class_embed.weight': torch.ones(5, 4),
    }
    for host in ('mmdet', 'mmseg'):
        converted, layout = convert_model_state_dict(d2, host)
        assert layout == 'detectron2-mask2former'
        assert converted == detectron2.mask2former_to_openmmlab(d2, host)
        assert not any(key.startswith('sem_seg_head.') for key in converted)


def test_a_model_of_another_library_has_no_host():
    assert host_of_model(torch.nn.Linear(1, 1)) is None  # any other model: loaded as it is


# ----------------------------------------------------------------------------- tools
DEMO_CLASSES = {
    'mmdet': ('circle', 'square', 'triangle'),
    'mmseg': ('wall', 'floor', 'circle', 'square', 'triangle'),
}


def demo_upstream_file(path: Path, library: str) -> tuple[Path, dict]:
    """An upstream-layout file of a demo config's model (configs/demo/*), mmcv 1.x meta."""
    if library == 'mmdet':  # mask-rcnn_nat-demo: NAT 32, depths 1-1-2-1, heads 64 / 256
        backbone = Backbone(False, 32, (1, 1, 2, 1), (1, 2, 4, 8), 3.0)
        heads = DetHeads(cascade=False, neck=64, fc=256, mask_convs=2, num_classes=3)
        weights = random_weights(detector_shapes(backbone, heads))
    else:  # dinat-demo_upernet: DiNAT 32, depths 2-2-2-1, heads 64 / 32
        backbone = Backbone(False, 32, (2, 2, 2, 1), (1, 2, 4, 8), 3.0)
        heads = SegHeads(channels=64, aux_channels=32, num_classes=5)
        weights = random_weights(segmentor_shapes(backbone, heads))
    meta = upstream_meta(library, DEMO_CLASSES[library], config='model = dict(...)')
    return write_upstream_file(path, mmcv1_checkpoint(weights, meta)), weights


def test_the_test_tool_evaluates_an_upstream_file_by_url(
    http_root, call_tool, demo_data, det_demo_config, tmp_path
):
    root, base = http_root
    demo_upstream_file(root / 'mask_rcnn_nat_demo_3x_coco.pth', 'mmdet')
    metrics, work_dir = tmp_path / 'metrics.json', tmp_path / 'test'
    url = f'{base}/mask_rcnn_nat_demo_3x_coco.pth'
    options = det_overrides(demo_data, None)
    argv = [
        det_demo_config,
        url,
        '--work-dir',
        work_dir,
        '--metrics-json',
        metrics,
        '--cfg-options',
        *options,
    ]
    assert call_tool('test', argv) == 0
    assert 'coco/bbox_mAP' in json.loads(metrics.read_text())
    (log,) = work_dir.glob('*/*.log')
    assert 'mmdet2 layout (mmdet 2.x (mmcv 1.x)' in log.read_text()


def test_the_inferencer_takes_the_class_names_of_an_upstream_file(det_demo_config, tmp_path):
    path, _ = demo_upstream_file(tmp_path / 'upstream.pth', 'mmdet')
    inferencer = init_inferencer(det_demo_config, str(path))
    assert inferencer.model.dataset_meta['classes'] == DEMO_CLASSES['mmdet']


def test_convert_to_mmseg1_round_trip(call_tool, capsys, seg_demo_config, tmp_path):
    source, weights = demo_upstream_file(tmp_path / 'upernet_dinat_demo.pth', 'mmseg')
    converted = tmp_path / 'upernet_dinat_demo_mmseg1.pth'
    assert call_tool('convert_checkpoint', [source, converted, '--to', 'mmseg1']) == 0
    out = capsys.readouterr().out
    assert "dropped the training state of the mmseg0 checkpoint: ['optimizer']" in out
    assert f'converted {source} (mmseg0) -> {converted} (mmseg1)' in out
    # What mmengine and plain torch read (weights only): the state dict and the dataset meta.
    plain = torch.load(converted, weights_only=True)
    assert set(plain) == {'state_dict', 'meta'}
    assert list(plain['state_dict']) == list(weights)
    assert all(torch.equal(plain['state_dict'][k], v) for k, v in weights.items())
    palette = [ADE_PALETTE_HEAD[i % 3] for i in range(5)]
    assert plain['meta']['dataset_meta'] == {'classes': DEMO_CLASSES['mmseg'], 'palette': palette}
    assert plain['meta']['converted_from']['mmseg_version'] == '0.20.2+unknown'
    # The converted file is the host's own layout: loaded strictly, classes and palette read.
    inferencer = init_inferencer(seg_demo_config, str(converted))
    assert inferencer.model.dataset_meta == plain['meta']['dataset_meta']

    assert call_tool('convert_checkpoint', [source, converted, '--to', 'mmseg1']) == 2
    assert 'exists' in capsys.readouterr().err
    assert call_tool('convert_checkpoint', [source, converted, '--to', 'mmseg1', '--force']) == 0


def test_convert_to_mmdet3_refuses_what_is_not_a_whole_detector(call_tool, capsys, tmp_path):
    source, _ = demo_upstream_file(tmp_path / 'mask_rcnn.pth', 'mmdet')
    assert call_tool('convert_checkpoint', [source, tmp_path / 'x.pth', '--to', 'mmseg1']) == 2
    error = capsys.readouterr().err
    assert 'an mmdet model, not an mmseg one: it has roi_head., rpn_head.' in error
    backbone = tmp_path / 'backbone.pth'
    assert call_tool('convert_checkpoint', [source, backbone, '--to', 'original']) == 0
    capsys.readouterr()
    assert call_tool('convert_checkpoint', [backbone, tmp_path / 'y.pth', '--to', 'mmdet3']) == 2
    assert 'not a whole mmdet model' in capsys.readouterr().err
    out = tmp_path / 'z.safetensors'
    assert call_tool('convert_checkpoint', [source, out, '--to', 'mmdet3']) == 2
    assert 'written to a .pth file, not safetensors' in capsys.readouterr().err
    assert not out.exists()
    assert call_tool('convert_checkpoint', [source, tmp_path / 'm.pth', '--to', 'mmdet3']) == 0
    converted = load_checkpoint(tmp_path / 'm.pth')
    assert converted['meta']['dataset_meta'] == {'classes': DEMO_CLASSES['mmdet']}
