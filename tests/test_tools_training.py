"""A few training iterations of each demo family through the train tool, then the test tool.

Tiny on purpose (2 iterations, 64 px data, the second one after a resume): checks that the
configs, the NAT / DiNAT backbones, the datasets, nat_mm's runner, checkpoint hook and resume and
the metrics fit together on a CPU, not that anything is learned.
"""

import json

import pytest
import torch

from nat_mm.apis.main_job import det_overrides, seg_overrides
from nat_mm.checkpoint import load_checkpoint

ITERATIONS = 2


@pytest.mark.parametrize('family', ['detector', 'segmentor'])
def test_short_training_then_evaluation(family, demo_data, tmp_path, call_tool, request):
    config = request.getfixturevalue(f'{family[:3]}_demo_config')
    overrides = {'detector': det_overrides, 'segmentor': seg_overrides}[family]
    options = ['--cfg-options', *overrides(demo_data, ITERATIONS), 'train_dataloader.batch_size=2']
    work_dir = tmp_path / 'work'
    # Stopped after one iteration (not validated: val_begin), then resumed for the second.
    first = ['train_cfg.max_iters=1', f'train_cfg.val_begin={ITERATIONS}']
    assert call_tool('train', [config, '--work-dir', work_dir, *options, *first]) == 0
    halfway = work_dir / 'iter_1.pth'
    halfway_bytes = halfway.read_bytes()
    assert call_tool('train', [config, '--work-dir', work_dir, '--resume', *options]) == 0
    checkpoint = work_dir / f'iter_{ITERATIONS}.pth'
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(checkpoint)
    logs = [path.read_text() for path in work_dir.glob('*/*.log')]
    assert sum('resumed epoch: 0, iter: 1' in log for log in logs) == 1, 'resumed from iter 1'
    assert halfway.read_bytes() == halfway_bytes  # not retrained from scratch and saved again
    before, after = (load_checkpoint(path) for path in (halfway, checkpoint))
    assert (before['meta']['iter'], after['meta']['iter']) == (1, ITERATIONS)
    changed = [
        name
        for name, weight in after['state_dict'].items()
        if weight.is_floating_point() and not torch.equal(weight, before['state_dict'][name])
    ]
    assert any(name.startswith('backbone.') for name in changed), 'the resumed step trained'

    metrics_file = tmp_path / 'metrics.json'
    argv = [config, checkpoint, '--work-dir', tmp_path / 'test', '--metrics-json', metrics_file]
    assert call_tool('test', [*argv, *options]) == 0
    saved = json.loads(metrics_file.read_text())
    if family == 'detector':
        for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
            assert -1 <= saved[key] <= 1  # pycocotools gives -1 when nothing matches at all
    else:
        assert 0 <= saved['mIoU'] <= 100
