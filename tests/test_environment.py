"""The installed stack works: compiled mmcv ops, mmdet / mmseg, config inheritance, resume."""

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn


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


class _ToyModel(nn.Module):
    """The smallest model an mmengine Runner accepts (mode='loss' / 'predict')."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.data_preprocessor = nn.Identity()

    def forward(self, inputs, labels, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            return {'loss': ((out.squeeze(-1) - labels) ** 2).mean()}
        return out

    def train_step(self, data, optim_wrapper):
        losses = self(**data, mode='loss')
        optim_wrapper.update_params(losses['loss'])
        return {'loss': losses['loss'].detach()}


class _ToyDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.tensor([float(i), 1.0])
        return {'inputs': x, 'labels': x.sum()}


def _runner(work_dir, max_iters, resume):
    from nat_mm.engine import SafeLoadRunner

    return SafeLoadRunner(
        model=_ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=_ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        resume=resume,
        default_scope='mmengine',
    )


def test_runner_checkpoint_resumes_on_current_torch(tmp_path):
    runner = _runner(tmp_path, max_iters=4, resume=False)
    runner.train()
    ckpt = tmp_path / 'iter_4.pth'
    assert ckpt.is_file()
    # The checkpoint holds the message hub's HistoryBuffers: torch's weights-only default refuses
    # it, which is exactly what broke mmengine 0.10.7's resume on torch >= 2.6. SafeLoadRunner
    # reads it with nat_mm's restricted unpickler instead.
    if Version(torch.__version__) >= Version('2.6'):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(ckpt)

    resumed = _runner(tmp_path, max_iters=6, resume=True)
    resumed.train()
    assert resumed.iter == 6
    from nat_mm.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / 'iter_6.pth')
    assert state['meta']['iter'] == 6
    assert 'message_hub' in state
