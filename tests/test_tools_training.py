"""A few training iterations of each demo family through tools/train.py, then tools/test.py.

Tiny on purpose (2 iterations, 64 px data): checks that the configs, the NAT / DiNAT backbones,
the datasets and the metrics fit together on a CPU, not that anything is learned.
"""

import json
import os.path as osp
import runpy

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'detector': osp.join(REPO_ROOT, 'configs', 'demo', 'mask-rcnn_nat-demo_fpn_shapes-128.py'),
    'segmentor': osp.join(REPO_ROOT, 'configs', 'demo', 'dinat-demo_upernet_shapes-128.py'),
}
ITERATIONS = 2


def tool(name, function='main'):
    return runpy.run_path(osp.join(REPO_ROOT, 'tools', f'{name}.py'), run_name='tool')[function]


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    from nat_mm.data import DemoDataSettings, generate_demo_datasets

    root = tmp_path_factory.mktemp('training_data')
    settings = DemoDataSettings(num_train=4, num_val=2, height=64, width=64)
    generate_demo_datasets(str(root), settings)
    return str(root)


@pytest.mark.parametrize('family', ['detector', 'segmentor'])
def test_short_training_then_evaluation(family, demo_data, tmp_path):
    library = {'detector': 'mmdet', 'segmentor': 'mmseg'}[family]
    pytest.importorskip(library, reason=f'{library} is not installed')
    if family == 'detector':
        pytest.importorskip('pycocotools', reason='pycocotools is not installed')
    overrides = tool('main_job', f'{family[:3]}_overrides')(demo_data, ITERATIONS)
    options = ['--cfg-options', *overrides, 'train_dataloader.batch_size=2']
    work_dir = tmp_path / 'work'
    tool('train')([CONFIGS[family], '--work-dir', str(work_dir), *options])
    checkpoint = work_dir / f'iter_{ITERATIONS}.pth'
    assert checkpoint.is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(checkpoint)

    metrics_file = tmp_path / 'metrics.json'
    metrics = tool('test')(
        [CONFIGS[family], str(checkpoint), '--work-dir', str(tmp_path / 'test'),
         '--metrics-json', str(metrics_file), *options]
    )  # fmt: skip
    saved = json.loads(metrics_file.read_text())
    if family == 'detector':
        for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
            assert -1 <= saved[key] <= 1  # pycocotools gives -1 when nothing matches at all
    else:
        assert 0 <= saved['mIoU'] <= 100
    assert set(saved) == set(metrics)
