"""Command-line tools: input checks and error paths (clear message, non-zero exit).

Most checks call a tool's ``main`` in-process (fast); a few run the real script in a subprocess
to check the exit status and that the message reaches stderr without a traceback.
"""

import os
import os.path as osp
import runpy
import subprocess
import sys

import pytest
import torch

from nat_mm.tools_common import ToolError

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask-rcnn_nat-demo_fpn_shapes-128.py')
SEG_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'dinat-demo_upernet_shapes-128.py')


def tool_main(name):
    """The ``main`` of tools/<name>.py, loaded without running the script."""
    return runpy.run_path(osp.join(REPO_ROOT, 'tools', f'{name}.py'), run_name='tool')['main']


def run_script(name, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run(
        [sys.executable, osp.join(REPO_ROOT, 'tools', f'{name}.py'), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO_ROOT,
        timeout=300,
    )


@pytest.fixture
def pretrain_config(tmp_path):
    path = tmp_path / 'cls.py'
    path.write_text("default_scope = 'mmpretrain'\nmodel = dict(type='ImageClassifier')\n")
    return str(path)


# ----------------------------------------------------------------------------- subprocess: exit


def test_train_missing_config_exits_with_message(tmp_path):
    result = run_script('train', tmp_path / 'nope.py')
    assert result.returncode == 2
    assert 'does not exist' in result.stderr and 'nope.py' in result.stderr
    assert 'Traceback' not in result.stderr


def test_test_config_for_another_library_exits_with_message(pretrain_config, tmp_path):
    result = run_script('test', pretrain_config, tmp_path / 'x.pth')
    assert result.returncode == 2
    assert "default_scope='mmpretrain'" in result.stderr
    assert 'Traceback' not in result.stderr


def test_make_data_refuses_foreign_folder(tmp_path):
    (tmp_path / 'coco').mkdir()
    result = run_script('make_data', '--out', tmp_path, '--num-train', 2, '--num-val', 1)
    assert result.returncode == 2
    assert 'refusing to overwrite' in result.stderr


# ----------------------------------------------------------------------------- in-process checks


def test_train_rejects_config_without_library(tmp_path):
    path = tmp_path / 'plain.py'
    path.write_text('model = dict()\n')
    with pytest.raises(ToolError, match='default_scope=None'):
        tool_main('train')([str(path)])


def test_train_rejects_broken_config(tmp_path):
    path = tmp_path / 'broken.py'
    path.write_text('model = dict(\n')
    with pytest.raises(ToolError, match='cannot read config'):
        tool_main('train')([str(path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp is allowed with a GPU')
def test_train_amp_needs_a_gpu(tmp_path):
    path = tmp_path / 'det.py'
    path.write_text("default_scope = 'mmdet'\n")
    with pytest.raises(ToolError, match='--amp needs a CUDA GPU'):
        tool_main('train')([str(path), '--amp'])


def test_make_data_rejects_bad_settings(tmp_path):
    with pytest.raises(ToolError, match='num_train'):
        tool_main('make_data')(['--out', str(tmp_path), '--num-train', '0'])


def test_benchmark_rejects_unknown_backbone():
    with pytest.raises(ToolError, match="'nat-tiny'"):
        tool_main('benchmark')(['--backbone', 'resnet50', '--no-peer', '--iters', '1'])


def test_benchmark_rejects_missing_config(tmp_path):
    with pytest.raises(ToolError, match='does not exist'):
        tool_main('benchmark')([str(tmp_path / 'none.py')])


def test_demo_rejects_missing_input(tmp_path):
    list_images = runpy.run_path(osp.join(REPO_ROOT, 'tools', 'demo.py'))['list_images']
    with pytest.raises(ToolError, match='neither an image file nor a folder'):
        list_images(str(tmp_path / 'missing'), None)
    with pytest.raises(ToolError, match='holds no image'):
        list_images(str(tmp_path), None)
    for name in ('b.png', 'a.jpg', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert list_images(str(tmp_path), None) == [str(tmp_path / 'a.jpg'), str(tmp_path / 'b.png')]
    assert list_images(str(tmp_path), 1) == [str(tmp_path / 'a.jpg')]


def test_benchmark_measures_a_small_backbone():
    rows = tool_main('benchmark')(
        ['--backbone', 'nat-mini', '--shape', '64', '64', '--no-peer', '--iters', '1',
         '--warmup', '0', '--threads', '1', '--modes', 'infer']
    )  # fmt: skip
    assert len(rows) == 1
    assert rows[0]['seconds'] > 0 and rows[0]['peak_memory_mib'] > 0
    assert rows[0]['params_m'] == pytest.approx(19.47, abs=0.05)


# ----------------------------------------------------------------------------- with mmdet/mmseg


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    from nat_mm.data import DemoDataSettings, generate_demo_datasets

    root = tmp_path_factory.mktemp('tools_data')
    generate_demo_datasets(str(root), DemoDataSettings(num_train=4, num_val=2, height=64, width=64))
    return str(root)


def test_train_reports_missing_dataset_folder(tmp_path):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    missing = tmp_path / 'no_data'
    with pytest.raises(ToolError, match=r'no_data.*does not exist'):
        tool_main('train')(
            [DET_CONFIG, '--cfg-options', f'train_dataloader.dataset.data_root={missing}']
        )


def test_test_reports_missing_checkpoint(tmp_path):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    with pytest.raises(ToolError, match=r'checkpoint file .*missing\.pth.* does not exist'):
        tool_main('test')([DET_CONFIG, str(tmp_path / 'missing.pth')])


def test_test_reports_unreadable_checkpoint(tmp_path):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    path = tmp_path / 'garbage.pth'
    path.write_bytes(b'not a checkpoint')
    with pytest.raises(ToolError, match='cannot read checkpoint'):
        tool_main('test')([DET_CONFIG, str(path)])


def test_checkpoint_of_another_model_is_named_key_by_key(tmp_path):
    pytest.importorskip('mmseg', reason='mmsegmentation is not installed')
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    from mmengine.registry import MODELS, DefaultScope

    from nat_mm.tools_common import load_config, register_library

    register_library('mmseg')
    with DefaultScope.overwrite_default_scope('mmseg'):
        segmentor = MODELS.build(load_config(SEG_CONFIG).model)
    path = tmp_path / 'seg.pth'
    torch.save({'state_dict': segmentor.state_dict()}, path)
    with pytest.raises(ToolError) as error:
        tool_main('test')([DET_CONFIG, str(path)])
    message = str(error.value)
    assert 'does not match the config model' in message
    assert 'missing keys: ' in message and 'roi_head.' in message
    assert 'unexpected keys: ' in message and 'decode_head.' in message


def test_demo_reports_unreadable_image(tmp_path, demo_data):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    from mmengine.registry import MODELS, DefaultScope

    from nat_mm.tools_common import load_config, register_library

    register_library('mmdet')
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = MODELS.build(load_config(DET_CONFIG).model)
    checkpoint = tmp_path / 'det.pth'
    torch.save({'state_dict': detector.state_dict(), 'meta': {}}, checkpoint)
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'\xff\xd8 definitely not a jpeg')
    result = run_script('demo', DET_CONFIG, checkpoint, broken, '--out-dir', tmp_path / 'out')
    assert result.returncode == 2
    assert 'cannot read image' in result.stderr and 'broken.jpg' in result.stderr
