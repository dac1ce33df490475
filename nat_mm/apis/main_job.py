"""The main job (``make demo``): generate the demo data, train, evaluate and paint two models.

1. Generate the embedded demo datasets (COCO instances / panoptic + ADE20K layout).
2. Evaluate an untrained Mask R-CNN + NAT (bbox / segm mAP with pycocotools via CocoMetric).
3. Train it and evaluate it again.
4. Train and evaluate an UPerNet + DiNAT (mIoU via IoUMetric).
5. Paint predictions of both on validation images.
6. Print and save a summary (``<work-dir>/summary.json``).

Every stage runs nat_mm's command-line tool (``python -m nat_mm.tools.<name>``) in a subprocess,
so the job checks the tools too and each stage starts with fresh registries and memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from nat_mm.apis.config import build_model, load_config
from nat_mm.apis.datasets import generate_demo_data
from nat_mm.checkpoint import save_checkpoint_file
from nat_mm.data import ADE_SUBDIR, DemoDataSettings
from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes

# The demo configs ship in the repository's configs/demo folder.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'configs')
DET_CONFIG = os.path.join(CONFIG_DIR, 'demo', 'mask-rcnn_nat-demo_fpn_shapes-128.py')
SEG_CONFIG = os.path.join(CONFIG_DIR, 'demo', 'dinat-demo_upernet_shapes-128.py')
# mmengine validates after the last iteration whatever val_interval says; the job evaluates
# with the test tool right after training, so validation inside training is switched off.
NO_VALIDATION = ('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')


@dataclass(frozen=True)
class MainJobSettings:
    """What the main job runs on.

    Attributes:
        work_dir: Output folder (checkpoints, metrics, pictures, summary.json).
        data_root: Where the demo data is generated (reused when the settings match).
        num_train: Training images.
        num_val: Validation images.
        det_iters: Detector iterations, or None for the config's.
        seg_iters: Segmentor iterations, or None for the config's.
        pictures: Validation images to paint per model.
        force: Run into a work dir that holds an earlier run, replacing its files.
    """

    work_dir: str = 'work_dirs/main_job'
    data_root: str = 'data/nat_mm_demo'
    num_train: int = DemoDataSettings.num_train
    num_val: int = DemoDataSettings.num_val
    det_iters: int | None = None
    seg_iters: int | None = None
    pictures: int = 8
    force: bool = False


def det_overrides(data_root: str, iters: int | None) -> list[str]:
    """``--cfg-options`` pointing the detection config at ``data_root`` (and its length)."""
    coco = os.path.join(data_root, 'coco') + '/'
    options = [
        f'train_dataloader.dataset.data_root={coco}',
        f'val_dataloader.dataset.data_root={coco}',
        f'test_dataloader.dataset.data_root={coco}',
        f'val_evaluator.ann_file={coco}annotations/instances_val2017.json',
        f'test_evaluator.ann_file={coco}annotations/instances_val2017.json',
    ]
    return options + _length_overrides(iters)


def seg_overrides(data_root: str, iters: int | None) -> list[str]:
    """``--cfg-options`` pointing the segmentation config at ``data_root`` (and its length)."""
    ade = os.path.join(data_root, ADE_SUBDIR)
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return [f'{loader}.dataset.data_root={ade}' for loader in loaders] + _length_overrides(iters)


def _length_overrides(iters: int | None) -> list[str]:
    if iters is None:
        return []
    # Scheduler phases are clipped to the run; a checkpoint at the end (and halfway) is kept.
    warmup = min(50, max(1, iters // 4))
    return [
        f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={iters}',
        f'default_hooks.checkpoint.interval={max(1, iters // 2)}',
        f'param_scheduler.0.end={warmup}',
        f'param_scheduler.1.begin={warmup}',
        f'param_scheduler.1.end={iters}',
    ]


def run_tool_step(title: str, tool: str, arguments: list[str]) -> float:
    """Runs ``python -m nat_mm.tools.<tool>`` (output streamed); returns its wall time (s).

    Raises:
        NatMMError: The step exited with a non-zero status.
    """
    command = [sys.executable, '-m', f'nat_mm.tools.{tool}', *arguments]
    print(f'\n=== {title}\n$ {" ".join(command)}', flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise NatMMError(f'step "{title}" failed with exit status {completed.returncode}', tool)
    return time.perf_counter() - start


def save_untrained_checkpoint(config: str, overrides: list[str], path: str) -> None:
    """Builds the config's model with fresh initial weights and saves it as a checkpoint."""
    import torch

    cfg = load_config(config, _parse_overrides(overrides))
    torch.manual_seed(cfg.get('randomness', {}).get('seed', 0))
    model = build_model(cfg)
    model.init_weights()
    # Class names in the meta, as the Runner saves them, so that the pictures are labelled.
    meta = {'dataset_meta': dict(cfg.train_dataloader.dataset.metainfo)}
    save_checkpoint_file({'state_dict': model.state_dict(), 'meta': meta}, path)


def _parse_overrides(overrides: list[str]) -> dict:
    """``key=value`` strings -> the dict ``--cfg-options`` would give."""
    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *overrides]).cfg_options


def _final_checkpoint(work_dir: str) -> str:
    """The checkpoint the last training run in ``work_dir`` pointed at."""
    with open(os.path.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def summarize(results: dict) -> str:
    """The summary printed at the end of the job."""
    det_untrained, det, seg = (results[k] for k in ('detector_untrained', 'detector', 'segmentor'))
    lines = [
        '',
        '=' * 72,
        'nat_mm main job: summary',
        '=' * 72,
        f'data: {results["data"]["train_images"]} train / {results["data"]["val_images"]} val '
        f'images in {results["data"]["root"]}',
        f'Mask R-CNN + NAT (embed 32, depths 1-1-2-1, k7), {results["det_iters"]} iterations:',
        f'  bbox mAP  untrained {det_untrained["coco/bbox_mAP"]:.3f}  ->  trained '
        f'{det["coco/bbox_mAP"]:.3f}   (mAP50 {det["coco/bbox_mAP_50"]:.3f})',
        f'  segm mAP  untrained {det_untrained["coco/segm_mAP"]:.3f}  ->  trained '
        f'{det["coco/segm_mAP"]:.3f}   (mAP50 {det["coco/segm_mAP_50"]:.3f})',
        f'UPerNet + DiNAT (embed 32, depths 2-2-2-1, k7, dilation <= 4), '
        f'{results["seg_iters"]} iterations:',
        f'  mIoU {seg["mIoU"]:.2f}   aAcc {seg["aAcc"]:.2f}   mAcc {seg["mAcc"]:.2f}',
        f'pictures: {results["pictures"]["detector"]}',
        f'          {results["pictures"]["segmentor"]}',
        f'checkpoints: {results["checkpoints"]["detector"]}',
        f'             {results["checkpoints"]["segmentor"]}',
        'step times (s): '
        + ', '.join(f'{name} {seconds:.0f}' for name, seconds in results['times'].items()),
        f'total wall time: {results["total_seconds"] / 60:.1f} min; summary in '
        f'{os.path.join(results["work_dir"], "summary.json")}',
        '=' * 72,
    ]
    return '\n'.join(lines)


def _check_work_dir(work_dir: str, force: bool) -> None:
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise NatMMError('the work dir is a file, expected a folder', work_dir)
    if os.path.isdir(work_dir) and os.listdir(work_dir) and not force:
        raise NatMMError(
            'the work dir holds an earlier run; pass --force to replace its files '
            '(make demo DEMO_ARGS=--force), or choose another --work-dir',
            work_dir,
        )


def run_main_job(settings: MainJobSettings) -> dict:
    """Runs the whole job; returns the summary it also writes to ``summary.json``.

    Raises:
        NatMMError: A bad setting, a work dir with an earlier run (without ``force``), or a
            step that failed.
    """
    for config in (DET_CONFIG, SEG_CONFIG):
        if not os.path.isfile(config):
            raise NatMMError('the demo configs ship with the repository: run from a clone', config)
    work_dir, data_root = os.path.abspath(settings.work_dir), os.path.abspath(settings.data_root)
    _check_work_dir(work_dir, settings.force)
    try:
        data_settings = DemoDataSettings(num_train=settings.num_train, num_val=settings.num_val)
    except ValueError as error:
        raise NatMMError(str(error), '--num-train / --num-val') from error
    # SIGTERM becomes SystemExit, so subprocess.run kills the running step instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.perf_counter()
    det_dir, seg_dir = os.path.join(work_dir, 'detector'), os.path.join(work_dir, 'segmentor')
    force = ['--force'] if settings.force else []
    times: dict[str, float] = {}

    print('=== 1. demo data', flush=True)
    step_start = time.perf_counter()
    generate_demo_data(data_root, data_settings)
    times['data'] = time.perf_counter() - step_start

    det_options = det_overrides(data_root, settings.det_iters)
    seg_options = seg_overrides(data_root, settings.seg_iters)
    untrained = os.path.join(work_dir, 'untrained', 'detector.pth')
    step_start = time.perf_counter()
    save_untrained_checkpoint(DET_CONFIG, det_options, untrained)
    det_untrained_json = os.path.join(det_dir, 'metrics_untrained.json')
    run_tool_step('2. evaluate the untrained detector', 'test', [
        DET_CONFIG, untrained, '--work-dir', os.path.join(det_dir, 'test_untrained'),
        '--metrics-json', det_untrained_json, *force, '--cfg-options', *det_options,
    ])  # fmt: skip
    times['det_untrained_eval'] = time.perf_counter() - step_start

    trained = {}
    for name, config, folder, options, iters_key in (
        ('detector', DET_CONFIG, det_dir, det_options, 'det'),
        ('segmentor', SEG_CONFIG, seg_dir, seg_options, 'seg'),
    ):  # fmt: skip
        number = '3' if name == 'detector' else '4'
        times[f'{iters_key}_train'] = run_tool_step(f'{number}a. train the {name}', 'train', [
            config, '--work-dir', folder, *force, '--cfg-options', *options, *NO_VALIDATION,
        ])  # fmt: skip
        trained[name] = _final_checkpoint(folder)
        title = f'{number}b. evaluate the trained {name}'
        times[f'{iters_key}_eval'] = run_tool_step(title, 'test', [
            config, trained[name], '--work-dir', os.path.join(folder, 'test'),
            '--metrics-json', os.path.join(folder, 'metrics.json'), *force,
            '--cfg-options', *options,
        ])  # fmt: skip

    pictures = {name: os.path.join(work_dir, 'pictures', name) for name in trained}
    step_start = time.perf_counter()
    for name, config, options, images in (
        ('detector', DET_CONFIG, det_options, os.path.join(data_root, 'coco', 'val2017')),
        ('segmentor', SEG_CONFIG, seg_options,
         os.path.join(data_root, ADE_SUBDIR, 'images', 'validation')),
    ):  # fmt: skip
        run_tool_step(f'5. paint {name} predictions', 'demo', [
            config, trained[name], images, '--out-dir', pictures[name],
            '--limit', str(settings.pictures), *force, '--cfg-options', *options,
        ])  # fmt: skip
    times['pictures'] = time.perf_counter() - step_start

    results = {
        'work_dir': work_dir,
        'data': {
            'root': data_root,
            'train_images': settings.num_train,
            'val_images': settings.num_val,
        },
        'det_iters': settings.det_iters or load_config(DET_CONFIG).train_cfg.max_iters,
        'seg_iters': settings.seg_iters or load_config(SEG_CONFIG).train_cfg.max_iters,
        'detector_untrained': _read_json(det_untrained_json),
        'detector': _read_json(os.path.join(det_dir, 'metrics.json')),
        'segmentor': _read_json(os.path.join(seg_dir, 'metrics.json')),
        'pictures': pictures,
        'checkpoints': trained,
        'times': times,
        'total_seconds': time.perf_counter() - start,
    }
    atomic_write_bytes(
        json.dumps(results, indent=2).encode(), os.path.join(work_dir, 'summary.json')
    )
    print(summarize(results), flush=True)
    return results
