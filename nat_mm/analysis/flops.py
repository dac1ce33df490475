"""Parameters and GFLOPs of a NAT / DiNAT model: a whole mmdet / mmseg config or a bare backbone
(``tools/get_flops.py`` is its command line).

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

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from torch import nn

from nat_mm.apis.config import build_backbone, build_model, library_of, load_config
from nat_mm.errors import NatMMError
from nat_mm.ops.flops import OP_NAME

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048), 'backbone': (224, 224)}
# RoIs the mask heads see (module docstring).
MASK_ROIS = 100


def check_shape(shape: tuple[int, ...] | None, default: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` from None (the default), ``(S,)`` or ``(H, W)``, each >= 32.

    Raises:
        NatMMError: Any other shape.
    """
    if shape is None:
        return default
    if len(shape) not in (1, 2) or any(not isinstance(v, int) or v < 32 for v in shape):
        raise NatMMError(f'expected S or H W, each >= 32, got {list(shape)}', '--shape')
    return (shape[0], shape[0]) if len(shape) == 1 else (shape[0], shape[1])


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


def measure_flops(
    config: str | None = None,
    backbone: str | None = None,
    shape: tuple[int, ...] | None = None,
    cfg_options: dict | None = None,
    kernel_size: int | None = None,
    dilations: str | None = None,
    all_mask_rois: bool = False,
) -> dict:
    """Params and MACs of a config's model or of a bare backbone on one synthetic image.

    Args:
        config: mmdet or mmseg config (or give ``backbone``).
        backbone: Preset name such as 'nat-tiny' (see :func:`nat_mm.apis.backbone_presets`).
        shape: ``(H, W)`` or ``(S,)``; default per library (module docstring).
        cfg_options: Config overrides.
        kernel_size, dilations: Bare backbone only.
        all_mask_rois: Cascade Mask R-CNN: mask heads on every proposal.

    Returns:
        dict with 'name', 'shape' (H, W), 'params', 'macs', 'uncounted' (op name -> count).

    Raises:
        NatMMError: Bad arguments, or neighborhood attention went uncounted.
    """
    if (config is None) == (backbone is None):
        raise NatMMError('give exactly one of a config or a backbone', 'config / --backbone')
    torch.manual_seed(0)  # the RPN's proposals, hence the RoI-head count, depend on the input
    if backbone is not None:
        height, width = check_shape(shape, DEFAULT_SHAPES['backbone'])
        model: nn.Module = build_backbone(backbone, kernel_size, dilations)
        name = backbone
    else:
        if kernel_size is not None or dilations is not None:
            raise NatMMError(
                'kernel size and dilations apply to a bare backbone; for a config use '
                '--cfg-options model.backbone.kernel_size=...',
                '--kernel-size / --dilations',
            )
        cfg = load_config(config, cfg_options)
        scope = library_of(cfg)
        cfg.model.get('backbone', {}).pop('init_cfg', None)  # weights do not change the count
        detector_or_segmentor = build_model(cfg)
        if scope == 'mmseg' and getattr(detector_or_segmentor, 'auxiliary_head', None) is not None:
            detector_or_segmentor.auxiliary_head = None  # training only, as mmseg's get_flops
        height, width = check_shape(shape, DEFAULT_SHAPES[scope])
        model = TensorForward(
            detector_or_segmentor, synthetic_data_samples(scope, height, width), all_mask_rois
        )
        name = config
    params, macs, uncounted = count(model, torch.rand(1, 3, height, width))
    if OP_NAME in uncounted:
        raise NatMMError(
            f'neighborhood attention was not counted (no FLOP handle for {sorted(uncounted)})',
            'nat_mm.ops.flops',
        )
    return dict(name=name, shape=(height, width), params=params, macs=macs, uncounted=uncounted)
