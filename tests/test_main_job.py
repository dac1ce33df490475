"""End-to-end runs: a tiny main job (default suite); the full main job, resume after SIGKILL and
2-process torchrun (``pytest -m slow``)."""

import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

from nat_mm.apis.main_job import DET_CONFIG, SEG_CONFIG, det_overrides, seg_overrides
from nat_mm.checkpoint import load_checkpoint

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(REPO_ROOT, 'tools')
MAIN_JOB_LIMIT_S = 20 * 60

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def tool_env():
    return dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))


def overrides(family, data_root, iters):
    return {'det': det_overrides, 'seg': seg_overrides}[family](data_root, iters)


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    from nat_mm.data import DemoDataSettings, generate_demo_datasets

    root = str(tmp_path_factory.mktemp('slow_data'))
    generate_demo_datasets(root, DemoDataSettings(num_train=16, num_val=4, height=96, width=96))
    return root


def test_a_tiny_main_job_runs_every_step_and_keeps_its_results(tmp_path, run_cli):
    options = [
        '--work-dir',
        tmp_path / 'job',
        '--data-root',
        tmp_path / 'data',
        '--num-train',
        4,
        '--num-val',
        2,
        '--det-iters',
        2,
        '--seg-iters',
        2,
        '--pictures',
        1,
    ]
    result = run_cli('main_job', *options, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'nat_mm main job: summary' in result.stdout
    summary = json.loads((tmp_path / 'job' / 'summary.json').read_text())
    assert summary['det_iters'] == summary['seg_iters'] == 2
    assert 0 <= summary['segmentor']['mIoU'] <= 100
    for name, final in summary['checkpoints'].items():
        # Both iterations ran and trained: the halfway and the final checkpoint differ.
        assert final == str(tmp_path / 'job' / name / 'iter_2.pth')
        halfway, last = (
            load_checkpoint(osp.join(osp.dirname(final), f'iter_{i}.pth')) for i in (1, 2)
        )
        assert (halfway['meta']['iter'], last['meta']['iter']) == (1, 2)
        assert any(
            not torch.equal(weight, halfway['state_dict'][key])
            for key, weight in last['state_dict'].items()
            if key.startswith('backbone.')
        ), f'the {name} backbone did not change in its second iteration'
    for folder in summary['pictures'].values():
        assert len(os.listdir(folder)) == 1
    again = run_cli('main_job', *options)
    assert again.returncode == 2 and 'the work dir holds an earlier run' in again.stderr
    assert 'DEMO_ARGS=--force' in again.stderr


@pytest.mark.slow
def test_main_job_learns_within_time_limit(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            osp.join(TOOLS, 'main_job.py'),
            '--work-dir',
            str(tmp_path / 'job'),
            '--data-root',
            str(tmp_path / 'data'),
        ],
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=2 * MAIN_JOB_LIMIT_S,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'nat_mm main job: summary' in result.stdout
    summary = json.loads((tmp_path / 'job' / 'summary.json').read_text())
    trained = summary['detector']['coco/bbox_mAP']
    untrained = summary['detector_untrained']['coco/bbox_mAP']
    assert trained >= untrained + 0.2, (trained, untrained)
    assert summary['segmentor']['mIoU'] > 25  # 400 iterations: well above chance, far from done
    for folder in summary['pictures'].values():
        assert len(os.listdir(folder)) == 8
    assert elapsed < MAIN_JOB_LIMIT_S, f'main job took {elapsed / 60:.1f} min'


@pytest.mark.slow
def test_resume_after_sigkill_finishes_with_same_iterations(small_data, tmp_path):
    total, interval = 12, 3
    work_dir = tmp_path / 'work'
    options = [
        *overrides('det', small_data, total),
        f'default_hooks.checkpoint.interval={interval}',
        'default_hooks.checkpoint.max_keep_ckpts=-1',
        'train_dataloader.batch_size=2',
    ]
    command = [
        sys.executable,
        osp.join(TOOLS, 'train.py'),
        DET_CONFIG,
        '--work-dir',
        str(work_dir),
        '--cfg-options',
        *options,
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 600
        while not (work_dir / f'iter_{2 * interval}.pth').exists():
            assert process.poll() is None, 'training ended before it could be killed'
            assert time.monotonic() < deadline, 'no checkpoint within 10 minutes'
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (work_dir / f'iter_{total}.pth').exists(), 'killed too late to test a resume'

    resumed = subprocess.run(
        [*command, '--resume'],
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert 'resumed' in (resumed.stdout + resumed.stderr).lower()
    final = load_checkpoint(work_dir / f'iter_{total}.pth')
    assert final['meta']['iter'] == total
    for name in os.listdir(work_dir):  # every checkpoint left behind is complete
        if name.endswith('.pth'):
            load_checkpoint(work_dir / name)
    assert not [name for name in os.listdir(work_dir) if name.endswith('.partial')]


@pytest.mark.slow
def test_two_process_torchrun_trains_and_evaluates(small_data, tmp_path):
    work_dir = tmp_path / 'dist'
    options = [*overrides('seg', small_data, 4), 'train_dataloader.batch_size=2']
    train = subprocess.run(
        [
            'bash',
            osp.join(TOOLS, 'dist_train.sh'),
            SEG_CONFIG,
            '2',
            '--work-dir',
            str(work_dir),
            '--cfg-options',
            *options,
        ],
        cwd=REPO_ROOT,
        env=dict(tool_env(), PYTHON=sys.executable, PORT='29517'),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    checkpoint = work_dir / 'iter_4.pth'
    assert checkpoint.is_file()
    metrics_file = tmp_path / 'metrics.json'
    test = subprocess.run(
        [
            'bash',
            osp.join(TOOLS, 'dist_test.sh'),
            SEG_CONFIG,
            str(checkpoint),
            '2',
            '--work-dir',
            str(tmp_path / 'dist_test'),
            '--metrics-json',
            str(metrics_file),
            '--cfg-options',
            *options,
        ],
        cwd=REPO_ROOT,
        env=dict(tool_env(), PYTHON=sys.executable, PORT='29518'),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert test.returncode == 0, test.stderr[-4000:]
    assert 0 <= json.loads(metrics_file.read_text())['mIoU'] <= 100
    log = train.stdout + train.stderr
    assert 'Distributed training: True' in log and 'GPU number: 2' in log  # = world size
