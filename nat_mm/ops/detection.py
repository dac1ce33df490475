"""`torch.ops.nat_mm.nms` and `torch.ops.nat_mm.roi_align`: a two-stage detector's NMS and RoIAlign
as PyTorch operators, so that `torch.export` can capture them and ONNX can lower them.

mmcv's `nms` and `roi_align` are pybind kernels that torch.export cannot trace. Wrapped as custom
operators (as `library.py` does for na2d), an exported graph holds one node for each, whose kernel
is mmcv's own: eager results are bit for bit mmdet's. `onnx_translations()` lowers them to the
standard ONNX operators `NonMaxSuppression` and `RoiAlign` (opset 16 and later), which stock
onnxruntime runs:

- nms: greedy, in descending score order, a box is dropped when its IoU with a kept box is
  greater than the threshold; areas are (x2 - x1) * (y2 - y1) (mmcv's offset 0, what mmdet 3
  uses). Among exactly equal scores the order is the sort's (torch's CPU sort is not stable;
  onnxruntime takes the lower index first), so only the order of tied boxes may differ.
- roi_align: average pooling, `aligned=True` is ONNX's `coordinate_transformation_mode=
  'half_pixel'` (the -0.5 shift after scaling, no minimum size), `aligned=False` its
  'output_half_pixel' (RoIs at least 1 x 1); `sampling_ratio <= 0` is adaptive,
  ceil(RoI size / output size) samples per bin on each axis, in mmcv and in ONNX (0).
  A RoI of zero width or height gives zeros in mmcv (an empty grid counts as one sample).

The eager kernels need mmcv's compiled ops (`mmcv.ops`); the fake implementations need nothing, so
graphs capture the operators without mmcv's kernels being called.
"""

from __future__ import annotations

import torch

from .library import NAMESPACE


@torch.library.custom_op(f'{NAMESPACE}::nms', mutates_args=())
def nms_op(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) of the boxes [N, 4] (x1, y1, x2, y2) that NMS keeps, by descending score."""
    from mmcv.ops import nms

    _, keep = nms(boxes, scores, iou_threshold)  # offset 0, no score threshold, no max number
    return keep


@nms_op.register_fake
def _nms_fake(boxes, scores, iou_threshold):
    # How many boxes are kept depends on the data: a size the graph learns when it runs.
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.long)


@torch.library.custom_op(f'{NAMESPACE}::roi_align', mutates_args=())
def roi_align_op(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign (average) of features [B, C, H, W] in rois [K, 5] (batch index, x1, y1, x2, y2):
    [K, C, out_h, out_w]."""
    from mmcv.ops import roi_align

    size = tuple(output_size)
    return roi_align(
        features, rois, size, spatial_scale, sampling_ratio, 'avg', aligned
    ).contiguous()


@roi_align_op.register_fake
def _roi_align_fake(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return features.new_empty((rois.shape[0], features.shape[1], *output_size))


def onnx_translations() -> dict:
    """`{operator: onnxscript function}` for `torch.onnx.export(custom_translation_table=...)`.

    Needs onnxscript (the `export` extra), imported here only.
    """
    from onnxscript import INT64
    from onnxscript import opset18 as op

    # "No limit" for NonMaxSuppression's max_output_boxes_per_class (0 would select nothing).
    no_limit = 2**63 - 1

    def nms_onnx(boxes, scores, iou_threshold: float):
        # NonMaxSuppression takes [batches, N, 4] boxes and [batches, classes, N] scores and gives
        # (batch, class, box) rows in selection order: one batch, one class here.
        selected = op.NonMaxSuppression(
            op.Unsqueeze(boxes, [0]), op.Unsqueeze(scores, [0, 1]), no_limit, iou_threshold
        )
        return op.Reshape(op.Slice(selected, [2], [3], [1]), [-1])

    def roi_align_onnx(
        features,
        rois,
        output_size: list[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ):
        batch_indices = op.Cast(op.Reshape(op.Slice(rois, [0], [1], [1]), [-1]), to=INT64.dtype)
        return op.RoiAlign(
            features,
            op.Slice(rois, [1], [5], [1]),
            batch_indices,
            coordinate_transformation_mode='half_pixel' if aligned else 'output_half_pixel',
            mode='avg',
            output_height=output_size[0],
            output_width=output_size[1],
            sampling_ratio=max(sampling_ratio, 0),
            spatial_scale=spatial_scale,
        )

    return {
        torch.ops.nat_mm.nms.default: nms_onnx,
        torch.ops.nat_mm.roi_align.default: roi_align_onnx,
    }
