"""The main job (``make demo``): generate the demo data, train, evaluate and paint two models.

1. Generate the embedded demo datasets (COCO instances/panoptic + ADE20K layout).
2. Evaluate an untrained Mask R-CNN + NAT (bbox / segm mAP with pycocotools via CocoMetric).
3. Train it (tools/train.py) and evaluate it again (tools/test.py).
4. Train and evaluate an UPerNet + DiNAT (mIoU via IoUMetric).
5. Paint predictions of both on validation images (tools/demo.py).
6. Print and save a summary (``<work-dir>/summary.json``).

Every stage runs the real command-line tool in a subprocess, so the job checks the tools too.

    python tools/main_job.py [--work-dir work_dirs/main_job] [--data-root data/nat_mm_demo]
        [--det-iters N] [--seg-iters N] [--num-train N] [--num-val N] [--pictures N]
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

from nat_mm.data import ADE_SUBDIR, DemoDataSettings
from nat_mm.tools_common import ToolError, generate_demo_data, run_tool

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

DET_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask-rcnn_nat-demo_fpn_shapes-128.py')
SEG_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'dinat-demo_upernet_shapes-128.py')
TOOLS = osp.join(REPO_ROOT, 'tools')
# mmengine validates after the last iteration whatever val_interval says; the job evaluates
# with tools/test.py right after training, so validation inside training is switched off.
NO_VALIDATION = ('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DemoDataSettings()
    parser = argparse.ArgumentParser(description='nat_mm main job: data, train, evaluate, paint')
    parser.add_argument('--work-dir', default='work_dirs/main_job')
    parser.add_argument('--data-root', default='data/nat_mm_demo')
    parser.add_argument('--num-train', type=int, default=defaults.num_train)
    parser.add_argument('--num-val', type=int, default=defaults.num_val)
    parser.add_argument('--det-iters', type=int, help='detector iterations (config default)')
    parser.add_argument('--seg-iters', type=int, help='segmentor iterations (config default)')
    parser.add_argument('--pictures', type=int, default=8, help='validation images to paint')
    return parser.parse_args(argv)


def det_overrides(data_root: str, iters: int | None) -> list[str]:
    """``--cfg-options`` pointing the detection config at ``data_root`` (and its length)."""
    coco = osp.join(data_root, 'coco') + '/'
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
    ade = osp.join(data_root, ADE_SUBDIR)
    options = [f'{loader}.dataset.data_root={ade}' for loader in
               ('train_dataloader', 'val_dataloader', 'test_dataloader')]  # fmt: skip
    return options + _length_overrides(iters)


def _length_overrides(iters: int | None) -> list[str]:
    if iters is None:
        return []
    # Scheduler phases are clipped to the run; a checkpoint at the end (and halfway) is kept.
    return [
        f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={iters}',
        f'default_hooks.checkpoint.interval={max(1, iters // 2)}',
        f'param_scheduler.0.end={min(50, max(1, iters // 4))}',
        f'param_scheduler.1.begin={min(50, max(1, iters // 4))}',
        f'param_scheduler.1.end={iters}',
    ]


def run_step(title: str, command: list[str]) -> float:
    """Run a tool in a subprocess (output streamed); return its wall time in seconds."""
    print(f'\n=== {title}\n$ {" ".join(command)}', flush=True)
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False)
    if completed.returncode != 0:
        raise ToolError(f'step "{title}" failed with exit status {completed.returncode}')
    return time.perf_counter() - start


def save_untrained_checkpoint(config: str, overrides: list[str], path: str) -> None:
    """Build the config's model with fresh initial weights and save it as a checkpoint."""
    import torch
    from mmengine.config import DictAction
    from mmengine.registry import MODELS, DefaultScope

    from nat_mm.tools_common import library_of, load_config, register_library

    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = load_config(config, parser.parse_args(['--cfg-options', *overrides]).cfg_options)
    library = library_of(cfg)
    register_library(library)
    torch.manual_seed(cfg.get('randomness', {}).get('seed', 0))
    with DefaultScope.overwrite_default_scope(library):
        model = MODELS.build(cfg.model)
    model.init_weights()
    os.makedirs(osp.dirname(path), exist_ok=True)
    # Class names in the meta, as the Runner saves them, so that demo.py labels them right.
    meta = {'dataset_meta': dict(cfg.train_dataloader.dataset.metainfo)}
    torch.save({'state_dict': model.state_dict(), 'meta': meta}, path)


def configured_iterations(config: str) -> int:
    from mmengine.config import Config

    return Config.fromfile(config).train_cfg.max_iters


def read_metrics(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def final_checkpoint(work_dir: str) -> str:
    """The checkpoint the last training run in ``work_dir`` pointed at."""
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def summarize(results: dict, work_dir: str) -> str:
    det_untrained = results['detector_untrained']
    det = results['detector']
    seg = results['segmentor']
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
        f'{osp.join(work_dir, "summary.json")}',
        '=' * 72,
    ]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # SIGTERM becomes SystemExit, so subprocess.run kills the running step instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.perf_counter()
    work_dir = osp.abspath(args.work_dir)
    data_root = osp.abspath(args.data_root)
    det_dir, seg_dir = osp.join(work_dir, 'detector'), osp.join(work_dir, 'segmentor')
    python = sys.executable
    times: dict[str, float] = {}

    print('=== 1. demo data', flush=True)
    settings = DemoDataSettings(num_train=args.num_train, num_val=args.num_val)
    step_start = time.perf_counter()
    generate_demo_data(data_root, settings)
    times['data'] = time.perf_counter() - step_start

    det_options = det_overrides(data_root, args.det_iters)
    seg_options = seg_overrides(data_root, args.seg_iters)
    untrained = osp.join(det_dir, 'untrained.pth')
    step_start = time.perf_counter()
    save_untrained_checkpoint(DET_CONFIG, det_options, untrained)
    det_untrained_json = osp.join(det_dir, 'metrics_untrained.json')
    run_step('2. evaluate the untrained detector', [
        python, osp.join(TOOLS, 'test.py'), DET_CONFIG, untrained,
        '--work-dir', osp.join(det_dir, 'test_untrained'),
        '--metrics-json', det_untrained_json, '--cfg-options', *det_options,
    ])  # fmt: skip
    times['det_untrained_eval'] = time.perf_counter() - step_start

    times['det_train'] = run_step('3a. train the detector', [
        python, osp.join(TOOLS, 'train.py'), DET_CONFIG, '--work-dir', det_dir,
        '--cfg-options', *det_options, *NO_VALIDATION,
    ])  # fmt: skip
    det_checkpoint = final_checkpoint(det_dir)
    det_json = osp.join(det_dir, 'metrics.json')
    times['det_eval'] = run_step('3b. evaluate the trained detector', [
        python, osp.join(TOOLS, 'test.py'), DET_CONFIG, det_checkpoint,
        '--work-dir', osp.join(det_dir, 'test'), '--metrics-json', det_json,
        '--cfg-options', *det_options,
    ])  # fmt: skip

    times['seg_train'] = run_step('4a. train the segmentor', [
        python, osp.join(TOOLS, 'train.py'), SEG_CONFIG, '--work-dir', seg_dir,
        '--cfg-options', *seg_options, *NO_VALIDATION,
    ])  # fmt: skip
    seg_checkpoint = final_checkpoint(seg_dir)
    seg_json = osp.join(seg_dir, 'metrics.json')
    times['seg_eval'] = run_step('4b. evaluate the trained segmentor', [
        python, osp.join(TOOLS, 'test.py'), SEG_CONFIG, seg_checkpoint,
        '--work-dir', osp.join(seg_dir, 'test'), '--metrics-json', seg_json,
        '--cfg-options', *seg_options,
    ])  # fmt: skip

    pictures = {
        'detector': osp.join(work_dir, 'pictures', 'detector'),
        'segmentor': osp.join(work_dir, 'pictures', 'segmentor'),
    }
    step_start = time.perf_counter()
    for name, config, checkpoint, options, images in (
        ('detector', DET_CONFIG, det_checkpoint, det_options,
         osp.join(data_root, 'coco', 'val2017')),
        ('segmentor', SEG_CONFIG, seg_checkpoint, seg_options,
         osp.join(data_root, ADE_SUBDIR, 'images', 'validation')),
    ):  # fmt: skip
        run_step(f'5. paint {name} predictions', [
            python, osp.join(TOOLS, 'demo.py'), config, checkpoint, images,
            '--out-dir', pictures[name], '--limit', str(args.pictures),
            '--cfg-options', *options,
        ])  # fmt: skip
    times['pictures'] = time.perf_counter() - step_start

    results = {
        'data': {'root': data_root, 'train_images': args.num_train, 'val_images': args.num_val},
        'det_iters': args.det_iters or configured_iterations(DET_CONFIG),
        'seg_iters': args.seg_iters or configured_iterations(SEG_CONFIG),
        'detector_untrained': read_metrics(det_untrained_json),
        'detector': read_metrics(det_json),
        'segmentor': read_metrics(seg_json),
        'pictures': pictures,
        'checkpoints': {'detector': det_checkpoint, 'segmentor': seg_checkpoint},
        'times': times,
        'total_seconds': time.perf_counter() - start,
    }
    with open(osp.join(work_dir, 'summary.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print(summarize(results, work_dir), flush=True)
    return results


if __name__ == '__main__':
    run_tool(main)
