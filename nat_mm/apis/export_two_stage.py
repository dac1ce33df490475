"""A two-stage detector's tensor mode (Faster / Mask R-CNN) as one exportable network.

mmdet's `TwoStageDetector._forward` (``mode='tensor'``) runs the backbone and neck, the RPN's
proposals (`RPNHead.predict`) and `StandardRoIHead.forward` on them. Its RPN post-processing and
RoI extractor branch in Python on the data (``if not valid_mask.all()``, ``if bboxes.numel() >
0``, ``if inds.numel() > 0`` per level) and call mmcv's pybind kernels, which torch.export cannot
trace. `TwoStageTensorMode` computes the same, for one image, from mmdet's own modules
(``rpn_head.forward``, its prior generator and box coder, ``map_roi_levels``, the bbox and mask
heads) with the branches replaced by what they compute on every input (the mask always indexes,
NMS always runs, every level's RoIs are selected by their indices), and NMS and RoIAlign as the
operators of `nat_mm.ops.detection`. Its outputs, bit for bit mmdet's in eager mode:

- ``cls_score`` [K, num_classes + 1] and ``bbox_pred`` [K, 4 * num_classes] of the K proposals,
- ``mask_preds`` [min(K, 100), num_classes, 28, 28] of the first 100 (as mmdet's tensor mode),
- ``rois`` [K, 5] (batch index 0, x1, y1, x2, y2): the proposals, which decoding needs (e.g.
  ``roi_head.bbox_head.predict_by_feat((rois,), (cls_score,), (bbox_pred,), ...)``).

K depends on the data (NMS): an exported graph gives it when it runs. The image is the model's
input as `data_preprocessor` leaves it (normalised) and unpadded: its size is the ``img_shape``
that proposals are clipped to.
"""

from __future__ import annotations

import torch
from torch import nn

from nat_mm.errors import NatMMError
from nat_mm.ops import detection  # noqa: F401  (registers torch.ops.nat_mm.nms / roi_align)

# mmdet's StandardRoIHead.forward runs the mask head on the first 100 RoIs only.
MASK_ROIS = 100
# The keys of the RPN's NMS config followed here (mmcv's batched_nms with `type='nms'`).
NMS_KEYS = {'type', 'iou_threshold', 'split_thr', 'class_agnostic'}


class TwoStageTensorMode(nn.Module):
    """mmdet's tensor mode of a two-stage detector with an RPN and a `StandardRoIHead`, for a
    batch of one image, plus the proposals: (cls_score, bbox_pred[, mask_preds], rois).

    Args:
        model: An mmdet `TwoStageDetector` (Faster R-CNN, Mask R-CNN) in eval mode.

    Raises:
        NatMMError: What is not followed here, naming it: no RPN, another RPN or RoI head type
            (Cascade included), an RPN NMS config other than plain `nms`, RoI extractors other
            than `SingleRoIExtractor` with average `RoIAlign`, a shared head.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from mmcv.ops import RoIAlign
        from mmdet.models.dense_heads import RPNHead
        from mmdet.models.roi_heads import StandardRoIHead
        from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

        if not getattr(model, 'with_rpn', False):
            raise NatMMError('a two-stage detector with an RPN is needed', 'model.rpn_head')
        if type(model.rpn_head) is not RPNHead:
            raise NatMMError(
                f'rpn_head must be an RPNHead, got {type(model.rpn_head).__name__}',
                'model.rpn_head',
            )
        if type(model.roi_head) is not StandardRoIHead:
            raise NatMMError(
                f'roi_head must be a StandardRoIHead, got {type(model.roi_head).__name__} '
                '(Cascade and other RoI heads: export --features)',
                'model.roi_head',
            )
        if model.roi_head.with_shared_head:
            raise NatMMError('a shared RoI head is not supported', 'model.roi_head.shared_head')
        self.model = model
        self.rpn_cfg = _rpn_test_cfg(model.rpn_head.test_cfg)
        extractors = [model.roi_head.bbox_roi_extractor]
        if model.roi_head.with_mask:
            extractors.append(model.roi_head.mask_roi_extractor)
        for extractor in extractors:
            if type(extractor) is not SingleRoIExtractor:
                raise NatMMError(
                    f'RoI extractors must be SingleRoIExtractor, got {type(extractor).__name__}',
                    'model.roi_head',
                )
            for layer in extractor.roi_layers:
                if type(layer) is not RoIAlign or layer.pool_mode != 'avg':
                    raise NatMMError(
                        'RoI layers must be mmcv RoIAlign with pool_mode avg',
                        'model.roi_head.*_roi_extractor.roi_layer',
                    )
                if layer.use_torchvision:
                    raise NatMMError(
                        'RoIAlign(use_torchvision=True) is not followed (mmcv kernel only)',
                        'model.roi_head.*_roi_extractor.roi_layer.use_torchvision',
                    )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if image.dim() != 4 or image.shape[0] != 1:
            raise NatMMError(
                f'the image must be one 1 x C x H x W batch, got {list(image.shape)}', 'image'
            )
        roi_head = self.model.roi_head
        features = self.model.extract_feat(image)
        proposals = self.rpn_proposals(features, (image.shape[2], image.shape[3]))
        # bbox2roi for one image: batch index 0 in front of every box.
        rois = torch.cat([proposals.new_full((proposals.shape[0], 1), 0), proposals], dim=-1)
        extractor = roi_head.bbox_roi_extractor
        cls_score, bbox_pred = roi_head.bbox_head(
            roi_features(extractor, features[: extractor.num_inputs], rois)
        )
        outputs = [cls_score, bbox_pred]
        if roi_head.with_mask:
            extractor = roi_head.mask_roi_extractor
            mask_rois = rois[:MASK_ROIS]
            mask_features = roi_features(extractor, features[: extractor.num_inputs], mask_rois)
            outputs.append(roi_head.mask_head(mask_features))
        return (*outputs, rois)

    def align_outputs(self, outputs: list, expected: list) -> tuple[list, list]:
        """Another run's outputs (an exported file's) and eager's, rows paired by proposal.

        Proposals come sorted by score, and fp32 rounding (another runtime's kernels) may swap
        two of nearly equal score: each of the file's proposals is paired with eager's that is
        the same box (to 1e-5 of the largest coordinate), and the head outputs follow their
        proposals. Mask predictions pair where both proposals are among the first 100.

        Raises:
            NatMMError: Another count of proposals, or a proposal eager does not have (a score
                or IoU within rounding of a threshold decided otherwise).
        """
        rois, expected_rois = outputs[-1], expected[-1]
        if rois.shape != expected_rois.shape:
            raise NatMMError(
                f'the file gives {len(rois)} proposals, eager {len(expected_rois)}', 'out'
            )
        order = pair_rows(rois, expected_rois, 1e-5 * float(expected_rois.abs().max()))
        aligned = [outputs[0], outputs[1], rois]
        reference = [expected[0][order], expected[1][order], expected_rois[order]]
        if self.model.roi_head.with_mask:
            masks, expected_masks = outputs[2], expected[2]
            both = (order[: len(masks)] < len(expected_masks)).nonzero().squeeze(1)
            aligned.append(masks[both])
            reference.append(expected_masks[order[both]])
        return aligned, reference

    def rpn_proposals(
        self, features: tuple[torch.Tensor, ...], img_shape: tuple[int, int]
    ) -> torch.Tensor:
        """The RPN's proposals [K, 4] for image 0: `RPNHead.predict(..., rescale=False)`."""
        head, cfg = self.model.rpn_head, self.rpn_cfg
        cls_scores, bbox_preds = head(features)
        priors = head.prior_generator.grid_priors(
            [score.shape[-2:] for score in cls_scores],
            dtype=cls_scores[0].dtype,
            device=cls_scores[0].device,
        )
        # RPNHead._predict_by_feat_single: each level's top nms_pre scores.
        level_boxes, level_priors, level_scores, level_ids = [], [], [], []
        for level, (cls_score, bbox_pred, level_prior) in enumerate(
            zip(cls_scores, bbox_preds, priors, strict=True)
        ):
            reg_dim = head.bbox_coder.encode_size
            bbox_pred = bbox_pred[0].detach().permute(1, 2, 0).reshape(-1, reg_dim)
            cls_score = cls_score[0].detach().permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            # Softmax RPNs: foreground is class 0, background the last.
            scores = cls_score.sigmoid() if head.use_sigmoid_cls else cls_score.softmax(-1)[:, :-1]
            scores = torch.squeeze(scores)
            if 0 < cfg['nms_pre'] < scores.shape[0]:  # a size, not data
                ranked_scores, rank_inds = scores.sort(descending=True)
                top = rank_inds[: cfg['nms_pre']]
                scores = ranked_scores[: cfg['nms_pre']]
                bbox_pred, level_prior = bbox_pred[top, :], level_prior[top]
            level_boxes.append(bbox_pred)
            level_priors.append(level_prior)
            level_scores.append(scores)
            level_ids.append(scores.new_full((scores.size(0),), level, dtype=torch.long))
        bboxes = head.bbox_coder.decode(
            torch.cat(level_priors), torch.cat(level_boxes), max_shape=img_shape
        )
        scores, level_ids = torch.cat(level_scores), torch.cat(level_ids)
        count = bboxes.shape[0]
        if count >= cfg['split_thr']:
            raise NatMMError(
                f'{count} boxes reach the NMS split_thr {cfg["split_thr"]}: mmcv then runs NMS '
                'per level (not followed here); lower nms_pre or raise split_thr',
                'model.test_cfg.rpn.nms.split_thr',
            )
        # RPNHead._bbox_post_process: drop small boxes (the mask always indexes).
        valid = torch.ones_like(scores, dtype=torch.bool)
        if cfg['min_bbox_size'] >= 0:
            widths, heights = bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]
            valid = (widths > cfg['min_bbox_size']) & (heights > cfg['min_bbox_size'])
        # mmcv's batched_nms: levels apart by an offset above the largest coordinate of the
        # boxes kept (computed before the mask so that it exists for no box too; the same max).
        max_coordinate = torch.where(valid[:, None], bboxes, float('-inf')).max()
        bboxes, scores, level_ids = bboxes[valid], scores[valid], level_ids[valid]
        boxes_for_nms = bboxes
        if not cfg['class_agnostic']:
            offsets = level_ids.to(bboxes) * (max_coordinate + torch.tensor(1).to(bboxes))
            boxes_for_nms = bboxes + offsets[:, None]
        keep = torch.ops.nat_mm.nms(boxes_for_nms, scores, cfg['iou_threshold'])
        return bboxes[keep][: cfg['max_per_img']]


def roi_features(extractor: nn.Module, features: tuple, rois: torch.Tensor) -> torch.Tensor:
    """`SingleRoIExtractor.forward(features, rois)` without branches on the data: every level's
    RoIs (possibly none) are pooled from that level and written to their rows."""
    rois = rois.type_as(features[0])
    layers = extractor.roi_layers
    if len(features) == 1:
        return _roi_align(layers[0], features[0], rois)
    roi_feats = features[0].new_zeros(rois.size(0), extractor.out_channels, *layers[0].output_size)
    target_levels = extractor.map_roi_levels(rois, len(features))
    for level, (layer, feature) in enumerate(zip(layers, features, strict=False)):
        inds = (target_levels == level).nonzero(as_tuple=False).squeeze(1)
        roi_feats = roi_feats.index_put((inds,), _roi_align(layer, feature, rois[inds]))
    return roi_feats


def pair_rows(rows: torch.Tensor, expected: torch.Tensor, tolerance: float) -> torch.Tensor:
    """`order` with rows[i] == expected[order[i]] to `tolerance` (max abs), each expected row
    used once: the nearest unused one (rows within tolerance of each other are the same box).

    Raises:
        NatMMError: A row has no unused expected row within tolerance.
    """
    distances = (rows[:, None, :] - expected[None, :, :]).abs().amax(dim=-1)
    used = torch.zeros(len(expected), dtype=torch.bool)
    order = torch.empty(len(rows), dtype=torch.long)
    for index in range(len(rows)):
        candidates = distances[index].masked_fill(used, float('inf'))
        nearest = int(candidates.argmin())
        if not candidates[nearest] <= tolerance:
            raise NatMMError(
                f"proposal {index} of the file, {rows[index].tolist()}, is none of eager's "
                f'(nearest: {float(candidates[nearest]):.3g} away, tolerance {tolerance:.3g})',
                'out',
            )
        used[nearest] = True
        order[index] = nearest
    return order


def _roi_align(layer: nn.Module, feature: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """mmcv `RoIAlign` module `layer` on `rois`, as the operator nat_mm::roi_align."""
    return torch.ops.nat_mm.roi_align(
        feature, rois, list(layer.output_size), layer.spatial_scale, layer.sampling_ratio,
        layer.aligned,
    )  # fmt: skip


def _rpn_test_cfg(cfg) -> dict:
    """The RPN test config that `rpn_proposals` follows, checked: plain `nms`, offset 0."""
    where = 'model.test_cfg.rpn'
    if cfg is None or 'max_per_img' not in cfg or 'nms' not in cfg:
        raise NatMMError('the RPN test config needs nms and max_per_img', where)
    nms = dict(cfg['nms'])
    unknown = sorted(set(nms) - NMS_KEYS)
    if nms.get('type', 'nms') != 'nms' or unknown:
        raise NatMMError(
            f"only nms=dict(type='nms', iou_threshold=...) is followed, got {nms}", f'{where}.nms'
        )
    if 'iou_threshold' not in nms:
        raise NatMMError('the RPN NMS needs iou_threshold', f'{where}.nms.iou_threshold')
    return {
        'nms_pre': cfg.get('nms_pre', -1),
        'min_bbox_size': cfg.get('min_bbox_size', -1),
        'max_per_img': cfg['max_per_img'],
        'iou_threshold': float(nms['iou_threshold']),
        'split_thr': nms.get('split_thr', 10000),
        'class_agnostic': bool(nms.get('class_agnostic', False)),
    }
