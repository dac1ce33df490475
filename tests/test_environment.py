"""The installed stack works: compiled mmcv ops, mmdet / mmseg, config inheritance (resuming
mmengine runs on current torch: tests/test_engine_checkpoints.py)."""

import importlib.util
from pathlib import Path

import torch


def test_nat_mm_and_hosts_import():
    import mmcv
    import mmdet
    import mmseg

    import nat_mm

    assert mmcv.__version__ == '2.1.0'
    assert mmdet.__version__ == '3.3.0'
    assert mmseg.__version__ == '1.2.2'
    assert nat_mm.__version__


def test_mmcv_nms_runs_on_cpu():
    from mmcv.ops import nms

    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 9]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    # box 3 (0.95) suppresses boxes 0 and 1 (IoU 0.81, 0.79 > 0.5); box 2 does not overlap.
    assert keep.tolist() == [3, 2]
    assert torch.allclose(dets[:, 4], torch.tensor([0.95, 0.7]))


def test_mmcv_roi_align_forward_backward_on_cpu():
    from mmcv.ops import RoIAlign

    feat = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).requires_grad_()
    rois = torch.tensor([[0, 1, 1, 5, 5]], dtype=torch.float32)  # inside the map: no clamping
    layer = RoIAlign(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=False)
    out = layer(feat, rois)
    # The map is the linear ramp 8 * y + x, so each bin's bilinear average is the ramp at the bin
    # centre: (y, x) = (2, 2), (2, 4), (4, 2), (4, 4).
    expected = torch.tensor([[[[18.0, 20.0], [34.0, 36.0]]]])
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert torch.isclose(feat.grad.sum(), torch.tensor(4.0))  # 4 bins, each a weighted mean


def test_config_resolves_mmdet_and_mmseg_bases(tmp_path):
    from mmengine.config import Config

    det = tmp_path / 'det.py'
    det.write_text("_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']\n")
    seg = tmp_path / 'seg.py'
    seg.write_text("_base_ = ['mmseg::_base_/models/upernet_swin.py']\n")
    assert Config.fromfile(str(det)).model.type == 'MaskRCNN'
    assert Config.fromfile(str(seg)).model.decode_head.type == 'UPerHead'


def test_mmseg_stray_tests_package_is_gone():
    spec = importlib.util.find_spec('tests')
    site = Path(torch.__file__).parents[1]
    assert spec is None or site not in Path(spec.origin or '').parents
