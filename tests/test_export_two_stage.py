"""A two-stage detector (Mask R-CNN) exported whole: `torch.ops.nat_mm.nms` / `roi_align` against
mmcv and onnxruntime, `TwoStageTensorMode` against mmdet's tensor mode, its ExportedProgram and
its ONNX file (onnxruntime) against eager.

The demo config (random weights, 128 x 160) is exported once for the module (ONNX: about 30 s
here); the full-size NAT-Tiny Mask R-CNN is slow.
"""

from __future__ import annotations

import pytest
import torch
from mmengine.structures import InstanceData

from nat_mm.apis.export import build_network, compare, export_and_check
from nat_mm.apis.export_two_stage import TwoStageTensorMode
from nat_mm.errors import NatMMError
from nat_mm.ops import detection  # noqa: F401  (registers the operators)
from nat_mm.ops.export import to_onnx

mmcv_ops = pytest.importorskip('mmcv.ops', reason="mmcv's compiled ops: the detection kernels")

SIZE = (128, 160)
NMS_THRESHOLD = 0.5
# (output_size, spatial_scale, sampling_ratio, aligned): mmdet's setting (7 x 7, adaptive,
# aligned), a non-square output with a fixed grid, and the legacy unaligned mode.
ROI_ALIGN_CASES = [([7, 7], 0.25, 0, True), ([3, 5], 0.5, 2, True), ([14, 14], 0.125, 0, False)]
# The demo's RoIs span 5-130 px: a finest scale of 4 sends them to all four levels (8 / 16 / 32).
ALL_LEVELS = {
    'model.roi_head.bbox_roi_extractor.finest_scale': 4,
    'model.roi_head.mask_roi_extractor.finest_scale': 4,
}


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the error itself for a zero tensor)."""
    error, scale = (actual - expected).abs().max(), expected.abs().max()
    return float(error / scale) if scale > 0 else float(error)


def onnxruntime_session(path):
    ort = pytest.importorskip('onnxruntime', reason='onnxruntime: the export extra')
    return ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


# --- the operators ------------------------------------------------------------------------------


class DetectionOps(torch.nn.Module):
    """nms at NMS_THRESHOLD and roi_align in every ROI_ALIGN_CASES setting."""

    def forward(self, boxes, scores, features, rois):
        pooled = [torch.ops.nat_mm.roi_align(features, rois, *case) for case in ROI_ALIGN_CASES]
        return torch.ops.nat_mm.nms(boxes, scores, NMS_THRESHOLD), *pooled


def random_boxes(count: int, generator: torch.Generator, extent: float = 60.0) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * extent
    size = torch.rand(count, 2, generator=generator) * extent / 2
    return torch.cat([corner, corner + size], dim=1)


@pytest.fixture(scope='module')
def ops_in_onnxruntime(tmp_path_factory):
    """`run(boxes, scores, features, rois)`: DetectionOps in onnxruntime, dynamic N and K."""
    generator = torch.Generator().manual_seed(0)
    example = (
        random_boxes(12, generator), torch.rand(12, generator=generator), torch.randn(2, 3, 16, 20),
        torch.cat([torch.zeros(5, 1), random_boxes(5, generator)], dim=1),
    )  # fmt: skip
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        DetectionOps(), example, dynamic_shapes=({0: auto}, {0: auto}, None, {0: auto})
    )
    path = tmp_path_factory.mktemp('ops') / 'ops.onnx'
    onnx_program = to_onnx(program, path)
    session = onnxruntime_session(path)
    names = [node.name for node in session.get_inputs()]
    nodes = {node.op_type for node in onnx_program.model_proto.graph.node}
    assert {'NonMaxSuppression', 'RoiAlign'} <= nodes

    def run(*inputs):
        outputs = session.run(None, dict(zip(names, [x.numpy() for x in inputs], strict=True)))
        return [torch.from_numpy(out) for out in outputs]

    return run


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """The rule, written out: by descending score, keep a box unless its IoU with a kept box is
    greater than the threshold (areas (x2 - x1) * (y2 - y1), float32)."""
    kept: list[int] = []
    for index in scores.argsort(descending=True, stable=True).tolist():
        box = boxes[index]
        suppressed = False
        for other in kept:
            low = torch.maximum(boxes[other, :2], box[:2])
            high = torch.minimum(boxes[other, 2:], box[2:])
            inter = (high - low).clamp(min=0).prod()
            areas = (boxes[other, 2:] - boxes[other, :2]).prod() + (box[2:] - box[:2]).prod()
            if inter / (areas - inter) > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(index)
    return kept


def test_nms_is_mmcv_and_onnxruntime_on_random_boxes(ops_in_onnxruntime) -> None:
    """Distinct scores: the operator, mmcv's nms, onnxruntime and the written-out rule agree."""
    generator = torch.Generator().manual_seed(1)
    boxes, scores = random_boxes(200, generator), torch.rand(200, generator=generator)
    features, rois = torch.randn(2, 3, 16, 20), torch.zeros(0, 5)
    keep = torch.ops.nat_mm.nms(boxes, scores, NMS_THRESHOLD)
    assert torch.equal(keep, mmcv_ops.nms(boxes, scores, NMS_THRESHOLD)[1])
    assert keep.tolist() == greedy_nms(boxes, scores, NMS_THRESHOLD)
    assert 20 < len(keep) < 180  # boxes overlap: NMS drops some, not all
    assert torch.equal(ops_in_onnxruntime(boxes, scores, features, rois)[0], keep)
    # The threshold matters: a test of the wrong one would fail.
    assert not torch.equal(torch.ops.nat_mm.nms(boxes, scores, 0.6), keep)


def test_nms_edge_cases_agree_with_onnxruntime(ops_in_onnxruntime) -> None:
    """IoU exactly at the threshold (kept: 'greater than' suppresses), just above it, identical
    boxes, zero-area boxes, boxes at 0 and far out, and no boxes at all."""
    boxes = torch.tensor([
        [0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0],  # IoU 2 / 4 = 0.5: both kept
        [10.0, 0.0, 13.0, 1.0], [10.9, 0.0, 13.9, 1.0],  # IoU 2.1 / 3.9 > 0.5: second dropped
        [20.0, 20.0, 30.0, 30.0], [20.0, 20.0, 30.0, 30.0],  # identical: second dropped
        [40.0, 40.0, 40.0, 50.0], [40.0, 40.0, 40.0, 50.0],  # zero area: IoU 0, both kept
        [0.0, 0.0, 0.0, 0.0], [1e5, 1e5, 1e5 + 1.0, 1e5 + 2.0],
    ])  # fmt: skip
    scores = torch.linspace(1.0, 0.1, len(boxes))
    features, rois = torch.randn(2, 3, 16, 20), torch.zeros(0, 5)
    keep = torch.ops.nat_mm.nms(boxes, scores, NMS_THRESHOLD)
    assert keep.tolist() == [0, 1, 2, 4, 6, 7, 8, 9]
    assert torch.equal(ops_in_onnxruntime(boxes, scores, features, rois)[0], keep)
    empty = torch.ops.nat_mm.nms(torch.zeros(0, 4), torch.zeros(0), NMS_THRESHOLD)
    assert empty.shape == (0,) and empty.dtype == torch.long
    outputs = ops_in_onnxruntime(torch.zeros(0, 4), torch.zeros(0), features, rois)
    assert outputs[0].shape == (0,)


def test_nms_ties_keep_the_same_boxes_in_an_order_of_their_own(ops_in_onnxruntime) -> None:
    """Equal scores: torch's sort (mmcv) is not stable, onnxruntime takes the lower index first.
    Apart boxes: the same set, each in its own order; an overlapping pair: one kept in both."""
    apart = torch.arange(40.0)[:, None] * 10 + torch.tensor([0.0, 0.0, 5.0, 5.0])
    scores = torch.full((40,), 0.5)
    features, rois = torch.randn(2, 3, 16, 20), torch.zeros(0, 5)
    keep = torch.ops.nat_mm.nms(apart, scores, NMS_THRESHOLD)
    in_onnx = ops_in_onnxruntime(apart, scores, features, rois)[0]
    assert sorted(keep.tolist()) == sorted(in_onnx.tolist()) == list(range(40))
    assert in_onnx.tolist() == list(range(40))
    pair = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.5, 10.0]])
    tied = torch.full((2,), 0.5)
    assert len(torch.ops.nat_mm.nms(pair, tied, NMS_THRESHOLD)) == 1
    assert ops_in_onnxruntime(pair, tied, features, rois)[0].tolist() == [0]


def test_roi_align_is_mmcv_and_onnxruntime(ops_in_onnxruntime) -> None:
    """Random RoIs, RoIs across and beyond the borders, tiny (0.01 px), empty (zero width) and
    huge ones (many adaptive samples), on both images of the batch: onnxruntime's RoiAlign
    equals mmcv's to fp32 rounding in every setting."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 16, 20, generator=generator)
    special = torch.tensor([
        [0, -20, -20, 30, 30], [1, 70, 50, 90, 70], [0, -50, -40, -10, -5],
        [1, 10, 10, 10.01, 10.01], [0, 12, 12, 12, 30], [1, -300, -200, 500, 400],
        [0, 0, 0, 80, 64], [1, 79.5, 63.5, 80, 64],
    ])  # fmt: skip
    batch = torch.randint(0, 2, (40, 1), generator=generator).float()
    rois = torch.cat([special, torch.cat([batch, random_boxes(40, generator, 80.0)], dim=1)])
    boxes, scores = torch.zeros(0, 4), torch.zeros(0)
    outputs = ops_in_onnxruntime(boxes, scores, features, rois)[1:]
    for case, in_onnx in zip(ROI_ALIGN_CASES, outputs, strict=True):
        output_size, scale, sampling_ratio, aligned = case
        eager = torch.ops.nat_mm.roi_align(features, rois, *case)
        mmcv = mmcv_ops.roi_align(
            features, rois, tuple(output_size), scale, sampling_ratio, 'avg', aligned
        )
        assert torch.equal(eager, mmcv) and eager.shape == (len(rois), 3, *output_size)
        assert torch.isfinite(in_onnx).all()
        assert (in_onnx - eager).abs().max() <= 1e-6 * features.abs().max(), case
    # Aligned and unaligned differ (the half-pixel shift): the check tells the modes apart.
    aligned = torch.ops.nat_mm.roi_align(features, rois, [7, 7], 0.25, 0, True)
    unaligned = torch.ops.nat_mm.roi_align(features, rois, [7, 7], 0.25, 0, False)
    assert (aligned - unaligned).abs().max() > 0.1


def test_operators_pass_opcheck() -> None:
    """Schemas and fake implementations (the data-dependent size of nms included)."""
    generator = torch.Generator().manual_seed(4)
    boxes, scores = random_boxes(20, generator), torch.rand(20, generator=generator)
    torch.library.opcheck(torch.ops.nat_mm.nms.default, (boxes, scores, 0.5))
    rois = torch.cat([torch.zeros(6, 1), random_boxes(6, generator)], dim=1)
    features = torch.randn(1, 3, 16, 20)
    torch.library.opcheck(
        torch.ops.nat_mm.roi_align.default, (features, rois, [7, 7], 0.25, 0, True)
    )


# --- the detector -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def demo(det_demo_config):
    """The demo Mask R-CNN (random weights), its TwoStageTensorMode, an image and eager outputs."""
    torch.manual_seed(0)
    network, name = build_network(det_demo_config, cfg_options=ALL_LEVELS)
    image = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        eager = network(image)
    return network, name, image, eager


@pytest.fixture(scope='module')
def demo_program(demo):
    network, _, image, _ = demo
    with torch.no_grad():
        return torch.export.export(network, (image,))


def mmdet_tensor_mode(model, image: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """mmdet's `model._forward` (tensor mode) and the RPN's proposals, for one image."""
    from mmdet.structures import DetDataSample

    sample = DetDataSample(metainfo={'img_shape': tuple(image.shape[2:])})
    with torch.no_grad():
        (heads,) = model._forward(image, [sample])
        proposals = model.rpn_head.predict(model.extract_feat(image), [sample], rescale=False)
    return heads, proposals[0].bboxes


def heads_on(model, image: torch.Tensor, rois: torch.Tensor) -> tuple:
    """mmdet's `StandardRoIHead.forward` on eager features and the given rois."""
    with torch.no_grad():
        return model.roi_head.forward(model.extract_feat(image), [InstanceData(bboxes=rois[:, 1:])])


def assert_matches_eager(network, image, outputs: list, eager: tuple) -> None:
    """Same proposals: the count, and the boxes to fp32 rounding, paired by `align_outputs`
    (two of nearly equal score may swap). The heads on the file's proposals equal eager heads on
    them to 1e-5 (max error relative to the largest value); paired with eager's outputs, to 1e-4:
    RoIAlign turns the proposals' rounding (1e-6) into 1e-5 on random weights' rough features."""
    assert [out.shape for out in outputs] == [want.shape for want in eager]
    aligned, reference = network.align_outputs(outputs, list(eager))
    assert max_relative_error(aligned[2], reference[2]) <= 1e-5
    own_rois = heads_on(network.model, image, outputs[-1])
    for out, want in zip(outputs[:-1], own_rois, strict=True):
        assert max_relative_error(out, want) <= 1e-5
    for out, want in zip(aligned[:2] + aligned[3:], reference[:2] + reference[3:], strict=True):
        assert max_relative_error(out, want) <= 1e-4


def test_eager_is_mmdet_tensor_mode_bit_for_bit(demo) -> None:
    network, name, image, eager = demo
    assert isinstance(network, TwoStageTensorMode) and 'proposals' in name
    heads, proposals = mmdet_tensor_mode(network.model, image)
    cls_score, bbox_pred, mask_preds, rois = eager
    assert len(heads) == 3
    for ours, theirs in zip((cls_score, bbox_pred, mask_preds), heads, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(rois[:, 1:], proposals) and torch.equal(rois[:, 0], torch.zeros(len(rois)))
    assert mask_preds.shape[0] == min(len(rois), 100)
    levels = network.model.roi_head.bbox_roi_extractor.map_roi_levels(rois, 4)
    assert (levels.bincount(minlength=4) > 0).all(), 'every RoI level must be exercised'


def test_the_comparison_catches_a_wrong_threshold_and_a_dropped_level(demo, monkeypatch) -> None:
    """mmdet with the RPN's NMS at another IoU threshold, or one RoI level's features dropped,
    no longer gives TwoStageTensorMode's outputs (read at construction): the checks above would
    catch such a mistake in it."""
    network, _, image, eager = demo
    model = network.model
    monkeypatch.setitem(model.rpn_head.test_cfg.nms, 'iou_threshold', 0.6)
    _, proposals = mmdet_tensor_mode(model, image)
    assert proposals.shape != eager[-1][:, 1:].shape or not torch.equal(proposals, eager[-1][:, 1:])
    monkeypatch.undo()
    layer = model.roi_head.bbox_roi_extractor.roi_layers[2]
    monkeypatch.setattr(layer, 'forward', lambda features, rois: layer.__class__.forward(
        layer, torch.zeros_like(features), rois))  # fmt: skip
    heads, _ = mmdet_tensor_mode(model, image)
    assert not torch.equal(heads[0], eager[0]) and max_relative_error(heads[0], eager[0]) > 1e-3


def test_exported_program_matches_eager(demo, demo_program, tmp_path) -> None:
    network, _, image, eager = demo
    targets = {str(node.target) for node in demo_program.graph.nodes}
    assert {'nat_mm.nms.default', 'nat_mm.roi_align.default'} <= targets
    path = tmp_path / 'mask_rcnn.pt2'
    torch.export.save(demo_program, path)
    with torch.no_grad():
        outputs = list(torch.export.load(path).module()(image))
    assert_matches_eager(network, image, outputs, eager)


def test_onnx_file_runs_in_onnxruntime_like_eager(demo, demo_program, tmp_path) -> None:
    """Standard ONNX operators only; same proposals as eager, heads to fp32 rounding."""
    network, _, image, eager = demo
    path = tmp_path / 'mask_rcnn.onnx'
    onnx_program = to_onnx(demo_program, path)
    domains = {node.domain for node in onnx_program.model_proto.graph.node}
    assert domains <= {'', 'ai.onnx'} and not onnx_program.model_proto.functions
    session = onnxruntime_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    assert_matches_eager(network, image, [torch.from_numpy(out) for out in outputs], eager)


def test_what_is_not_followed_is_refused(demo, det_demo_config, repo_root) -> None:
    network, _, image, _ = demo
    with pytest.raises(NatMMError, match=r'one 1 x C x H x W batch.*\(image\)'):
        network(image.repeat(2, 1, 1, 1))
    soft = {'model.test_cfg.rpn.nms.type': 'soft_nms'}
    with pytest.raises(NatMMError, match=r"type='nms'.*model\.test_cfg\.rpn\.nms"):
        build_network(det_demo_config, cfg_options=soft)
    split = {'model.test_cfg.rpn.nms.split_thr': 100}
    split_network, _ = build_network(det_demo_config, cfg_options=split)
    with pytest.raises(NatMMError, match='split_thr'):
        split_network(image)
    cascade = (
        'configs/mmdet/nat/cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
    )
    with pytest.raises(NatMMError, match=r'CascadeRoIHead.*--features.*model\.roi_head'):
        build_network(str(repo_root / cascade))
    _, name = build_network(str(repo_root / cascade), features=True)
    assert 'backbone + neck' in name


def test_compare_reports_another_count_of_proposals(demo) -> None:
    """The tool's check compares the outputs one by one: a file that gives one proposal fewer
    is reported, naming the output."""
    network, _, image, _ = demo
    with pytest.raises(NatMMError, match=r'output 0 of the file has shape \[99, 4\], eager \[100'):
        compare(network, lambda image: [x[:-1] for x in network(image)], image)


@pytest.mark.slow
def test_export_and_check_writes_and_checks_a_two_stage_program(demo, tmp_path) -> None:
    network, name, _, _ = demo
    out = tmp_path / 'mask_rcnn.pt2'
    report = export_and_check(network, name, SIZE, out, 'exported-program', repeats=1)
    (row,) = report['rows']
    assert row['max_rel'] <= 1e-4 and out.exists()


def test_outputs_pair_by_proposal(demo) -> None:
    """Swapped proposals (nearly equal scores) pair back with their head outputs; a proposal that
    eager does not have is reported."""
    network, _, _, eager = demo
    swap = torch.arange(len(eager[-1]))
    swap[[3, 4, 98, 99]] = swap[[4, 3, 99, 98]]
    swapped = [out[swap[: len(out)]] for out in eager]
    aligned, reference = network.align_outputs(swapped, list(eager))
    assert all(torch.equal(a, b) for a, b in zip(aligned, reference, strict=True))
    assert not torch.equal(swapped[0], eager[0])
    moved = [out.clone() for out in eager]
    moved[-1][7, 3] += 1.0
    with pytest.raises(NatMMError, match=r"proposal 7 of the file.*none of eager's"):
        network.align_outputs(moved, list(eager))


@pytest.mark.slow
def test_full_size_mask_rcnn_exports_and_matches(repo_root, tmp_path) -> None:
    """NAT-Tiny Mask R-CNN (random weights) at 800 x 1216 to ONNX, checked in onnxruntime."""
    config = repo_root / 'configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py'
    torch.manual_seed(0)
    network, _ = build_network(str(config))
    image = torch.randn(1, 3, 800, 1216)
    with torch.no_grad():
        eager = network(image)
        program = torch.export.export(network, (image,))
    heads, proposals = mmdet_tensor_mode(network.model, image)
    for ours, theirs in zip(eager[:3], heads, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(eager[-1][:, 1:], proposals) and len(proposals) == 1000
    path = tmp_path / 'mask_rcnn_nat_tiny.onnx'
    to_onnx(program, path)
    session = onnxruntime_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    assert_matches_eager(network, image, [torch.from_numpy(out) for out in outputs], eager)
