"""Parameters and GFLOPs of a NAT / DiNAT model: a whole mmdet / mmseg config or a bare backbone.

Usage::

    python tools/get_flops.py configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_ms-crop-3x_coco.py
    python tools/get_flops.py \
        configs/mmseg/nat/nat-mini-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py --shape 512 512
    python tools/get_flops.py --backbone nat-tiny --shape 224

Conventions (the ones the published NAT / DiNAT numbers, fvcore, mmdet and mmseg use):

* "GFLOPs" are giga multiply-accumulates (GMACs): one fused multiply-add counts as one FLOP.
* What runs is what the host libraries' own ``get_flops.py`` measure: the model's ``_forward``
  (``mode='tensor'``) on one synthetic image, so a detector is counted with its RPN and RoI heads
  (on the RPN's proposals, at most ``test_cfg.rpn.max_per_img``), a segmentor with its decode head
  and without its auxiliary head (dropped, as mmseg does; its parameters are not counted either).
* Mask heads run on the first 100 RoIs: what mmdet 3.x's ``StandardRoIHead.forward`` does and what
  mmdet 2.x's ``forward_dummy`` (the published Cascade numbers) did for every RoI head. mmdet 3.x's
  ``CascadeRoIHead.forward`` alone runs its three mask heads on all proposals (about 1.4 TMACs more
  at 1280 x 800, three times the published count); ``--all-mask-rois`` counts it that way.
  No dataset is needed. A bare backbone is counted from image to its four output maps.
* Neighborhood attention is counted through the FLOP handle that ``import nat_mm`` registers with
  mmengine's analyzer; operators without a handle are listed, and the tool fails if neighborhood
  attention is among them rather than print a number that silently leaves it out.

Shapes are ``--shape H W`` (or ``--shape S`` for S x S). Defaults: 800 x 1280 for mmdet (the
1280 x 800 of the papers), 512 x 2048 for mmseg, 224 x 224 for a bare backbone.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
from collections.abc import Sequence

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.config import Config, DictAction
from torch import nn

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048), 'backbone': (224, 224)}
BACKBONE_FAMILIES = ('nat', 'dinat')
NA_OP_MARKER = 'NeighborhoodAttention'


class ToolError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


def parse_shape(values: Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """Turns ``--shape`` values into ``(height, width)``.

    Args:
        values: None, ``[S]`` or ``[H, W]``.
        default: Returned when ``values`` is None.

    Returns:
        ``(height, width)``.
    """
    if values is None:
        return default
    if len(values) not in (1, 2) or any(v < 32 for v in values):
        raise ToolError(f'--shape expects S or H W, each >= 32, got {list(values)}')
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def build_bare_backbone(name: str, kernel_size: int | None, dilations: str | None) -> nn.Module:
    """Builds ``nat-<arch>`` / ``dinat-<arch>`` with its published defaults.

    Args:
        name: e.g. 'nat-tiny', 'dinat-large'.
        kernel_size: Neighborhood size, or None for the default (7).
        dilations: DiNAT schedule name, or None for the class default.

    Returns:
        The backbone (all four stage outputs, with their norms, as in detection / segmentation).
    """
    from nat_mm.models import DINAT_ARCHS, NAT, NAT_ARCHS, DiNAT

    family, _, arch = name.lower().partition('-')
    classes = {'nat': (NAT, NAT_ARCHS), 'dinat': (DiNAT, DINAT_ARCHS)}
    if family not in classes or arch not in classes[family][1]:
        choices = [f'{f}-{a}' for f in BACKBONE_FAMILIES for a in classes[f][1]]
        raise ToolError(f'--backbone={name!r} is not known; expected one of {choices}')
    backbone_class, _ = classes[family]
    options = {'arch': arch}
    if kernel_size is not None:
        options['kernel_size'] = kernel_size
    if dilations is not None:
        options['dilations'] = dilations
    return backbone_class(**options)


def build_config_model(config_path: str, cfg_options: dict | None) -> tuple[nn.Module, str]:
    """Builds the model of an mmdet / mmseg config on CPU, SyncBN reverted, aux head dropped.

    Args:
        config_path: Path of the config file.
        cfg_options: ``--cfg-options`` overrides, or None.

    Returns:
        ``(model, scope)`` with scope 'mmdet' or 'mmseg' (the config's ``default_scope``).
    """
    if not osp.isfile(config_path):
        raise ToolError(f'config file not found: {config_path}')
    cfg = Config.fromfile(config_path)  # imports custom_imports, i.e. nat_mm
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg'):
        raise ToolError(f'{config_path}: default_scope={scope!r}; expected "mmdet" or "mmseg"')
    if 'model' not in cfg:
        raise ToolError(f'{config_path} has no `model`')
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope(scope)
    cfg.model.get('backbone', {}).pop('init_cfg', None)  # weights do not change the count
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # a training-only head, as mmseg's get_flops does
    return model, scope


def synthetic_data_samples(scope: str, height: int, width: int) -> list:
    """One data sample carrying the meta-information the heads read at test time."""
    meta = dict(
        img_shape=(height, width),
        ori_shape=(height, width),
        pad_shape=(height, width),
        batch_input_shape=(height, width),
        scale_factor=(1.0, 1.0),
    )
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample

        return [DetDataSample(metainfo=meta)]
    from mmseg.structures import SegDataSample

    return [SegDataSample(metainfo=meta)]


# RoIs the mask heads see (module docstring).
MASK_ROIS = 100


class TensorForward(nn.Module):
    """``model._forward(inputs, data_samples)`` as a one-argument module that jit can trace."""

    def __init__(self, model: nn.Module, data_samples: list, all_mask_rois: bool) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples
        self.all_mask_rois = all_mask_rois

    def forward(self, inputs: torch.Tensor):
        """Runs the tensor-mode forward.

        Args:
            inputs: ``[1, 3, H, W]`` image batch.

        Returns:
            The model's raw head outputs (tensors in tuples / lists).
        """
        decode_head = getattr(self.model, 'decode_head', None)
        if decode_head is not None and type(decode_head).__name__ == 'Mask2FormerHead':
            # mmseg's EncoderDecoder._forward calls decode_head.forward(x) without data samples,
            # which mmseg's Mask2FormerHead requires.
            return decode_head.forward(self.model.extract_feat(inputs), self.data_samples)
        roi_head = getattr(self.model, 'roi_head', None)
        cascade = type(roi_head).__name__ == 'CascadeRoIHead' and roi_head.with_mask
        if cascade and not self.all_mask_rois:
            return self._cascade_forward(inputs, roi_head)
        return self.model._forward(inputs, self.data_samples)

    def _cascade_forward(self, inputs: torch.Tensor, roi_head: nn.Module) -> tuple:
        """``TwoStageDetector._forward`` with the cascade's mask heads on the first MASK_ROIS."""
        from mmdet.structures.bbox import bbox2roi

        features = self.model.extract_feat(inputs)
        proposals = self.model.rpn_head.predict(features, self.data_samples, rescale=False)
        mask_head = roi_head.mask_head
        roi_head.mask_head = None  # `with_mask` is False: the bbox stages only
        try:
            box_outputs = roi_head.forward(features, proposals, self.data_samples)
        finally:
            roi_head.mask_head = mask_head
        rois = bbox2roi([result.bboxes for result in proposals])[:MASK_ROIS]
        masks = tuple(
            roi_head._mask_forward(stage, features, rois)['mask_preds']
            for stage in range(roi_head.num_stages)
        )
        return (box_outputs, masks)


def count(model: nn.Module, inputs: torch.Tensor) -> tuple[int, int, dict[str, int]]:
    """Parameters, MACs and uncounted operators of ``model(inputs)``.

    Args:
        model: Module whose forward takes ``inputs`` alone.
        inputs: ``[1, 3, H, W]``.

    Returns:
        ``(params, macs, uncounted)`` with ``uncounted`` mapping operator name -> occurrences.
    """
    model.eval()
    params = parameter_count(model)['']
    with torch.no_grad():
        analyzer = FlopAnalyzer(model, (inputs,))
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        macs = analyzer.total()
        uncounted = dict(analyzer.unsupported_ops())
    return params, macs, uncounted


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the tool."""
    parser = argparse.ArgumentParser(
        description='Params and GFLOPs (= GMACs, the fvcore / mmdet / mmseg convention) of a '
        'NAT / DiNAT config or bare backbone, on a synthetic image.'
    )
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config file')
    parser.add_argument('--backbone', help='bare backbone instead of a config, e.g. nat-tiny')
    parser.add_argument('--kernel-size', type=int, help='bare backbone: neighborhood size')
    parser.add_argument('--dilations', help='bare DiNAT backbone: schedule name, e.g. coco')
    parser.add_argument('--shape', type=int, nargs='+', help='input size: S or H W')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='config overrides, key=value'
    )
    parser.add_argument(
        '--all-mask-rois',
        action='store_true',
        help='Cascade Mask R-CNN: run the mask heads on every proposal, as mmdet 3.x tensor mode '
        f'does, instead of the first {MASK_ROIS} (the published counts)',
    )
    args = parser.parse_args(argv)
    if (args.config is None) == (args.backbone is None):
        parser.error('give exactly one of CONFIG or --backbone')
    if args.config is not None and (args.kernel_size or args.dilations):
        parser.error(
            '--kernel-size / --dilations apply to --backbone only; for a config use '
            '--cfg-options model.backbone.kernel_size=...'
        )
    return args


def measure(args: argparse.Namespace) -> dict:
    """Builds what ``args`` names and counts it.

    Returns:
        dict with 'name', 'shape' (H, W), 'params', 'macs', 'uncounted'.
    """
    import nat_mm  # noqa: F401  (registers the backbones and the neighborhood-attention handle)
    from nat_mm.ops.flops import register_flop_handles

    register_flop_handles()  # idempotent; keeps the count right whatever `import nat_mm` wires

    torch.manual_seed(0)  # the RPN's proposals, hence the RoI-head count, depend on the input
    if args.backbone is not None:
        height, width = parse_shape(args.shape, DEFAULT_SHAPES['backbone'])
        model = build_bare_backbone(args.backbone, args.kernel_size, args.dilations)
        name = args.backbone
    else:
        detector_or_segmentor, scope = build_config_model(args.config, args.cfg_options)
        height, width = parse_shape(args.shape, DEFAULT_SHAPES[scope])
        model = TensorForward(
            detector_or_segmentor,
            synthetic_data_samples(scope, height, width),
            args.all_mask_rois,
        )
        name = args.config
    params, macs, uncounted = count(model, torch.rand(1, 3, height, width))
    if any(NA_OP_MARKER in op for op in uncounted):
        raise ToolError(
            f'neighborhood attention was not counted (no FLOP handle for {sorted(uncounted)}); '
            'is nat_mm.ops.flops imported by nat_mm?'
        )
    return dict(name=name, shape=(height, width), params=params, macs=macs, uncounted=uncounted)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        result = measure(args)
    except ToolError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    height, width = result['shape']
    print(f'Model:  {result["name"]}')
    print(f'Input:  1 x 3 x {height} x {width} (H x W)')
    print(f'Params: {result["params"] / 1e6:.2f} M')
    print(f'GFLOPs: {result["macs"] / 1e9:.2f} (GMACs: one multiply-add = one FLOP, as fvcore)')
    if result['uncounted']:
        ops = ', '.join(f'{op} x{n}' for op, n in sorted(result['uncounted'].items()))
        print(f'Not counted (no FLOP handle, usually negligible): {ops}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
