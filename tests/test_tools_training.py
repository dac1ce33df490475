"""A few training iterations of each demo family through the train tool, then the test tool.

Tiny on purpose (2 iterations, 64 px data): checks that the configs, the NAT / DiNAT backbones,
the datasets, nat_mm's runner and checkpoint hook and the metrics fit together on a CPU, not that
anything is learned.
"""

import json

import pytest

from nat_mm.apis.main_job import det_overrides, seg_overrides

ITERATIONS = 2


@pytest.mark.parametrize('family', ['detector', 'segmentor'])
def test_short_training_then_evaluation(family, demo_data, tmp_path, call_tool, request):
    config = request.getfixturevalue(f'{family[:3]}_demo_config')
    overrides = {'detector': det_overrides, 'segmentor': seg_overrides}[family]
    options = ['--cfg-options', *overrides(demo_data, ITERATIONS), 'train_dataloader.batch_size=2']
    work_dir = tmp_path / 'work'
    assert call_tool('train', [config, '--work-dir', work_dir, *options]) == 0
    checkpoint = work_dir / f'iter_{ITERATIONS}.pth'
    assert checkpoint.is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(checkpoint)
    # Resuming a finished run loads its last checkpoint and trains no further.
    assert call_tool('train', [config, '--work-dir', work_dir, '--resume', *options]) == 0

    metrics_file = tmp_path / 'metrics.json'
    argv = [config, checkpoint, '--work-dir', tmp_path / 'test', '--metrics-json', metrics_file]
    assert call_tool('test', [*argv, *options]) == 0
    saved = json.loads(metrics_file.read_text())
    if family == 'detector':
        for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
            assert -1 <= saved[key] <= 1  # pycocotools gives -1 when nothing matches at all
    else:
        assert 0 <= saved['mIoU'] <= 100
