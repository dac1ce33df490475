"""Test (evaluate) an mmdet or mmseg model from a config and a checkpoint.

Same behaviour and flags as mmdet's and mmseg's ``tools/test.py``; the library is chosen from
the config's ``default_scope``. Before anything runs, the checkpoint is compared strictly with
the config's model and any missing, unexpected or mis-shaped keys are reported.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--tta]
        [--out FILE_OR_DIR] [--metrics-json FILE] [--cfg-options KEY=VALUE ...]
        [--launcher none|pytorch|slurm]
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import warnings
from copy import deepcopy

from mmengine.config import Config, ConfigDict, DictAction

from nat_mm.tools_common import (
    ToolError,
    check_checkpoint_matches,
    check_dataset_folders,
    library_of,
    load_config,
    prepare_launcher,
    register_library,
    run_tool,
    set_local_rank,
    set_work_dir,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector or segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument(
        '--out', help='mmdet: dump predictions to this .pkl; mmseg: save prediction PNGs here'
    )
    parser.add_argument('--metrics-json', help='also write the metrics to this JSON file')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='save painted predictions in this dir')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (e.g. test_dataloader.batch_size=2)',
    )
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def enable_visualization(cfg: Config, library: str, args: argparse.Namespace) -> None:
    """Turn on the visualization hook the way each library's test.py does."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ToolError('--show/--show-dir need default_hooks.visualization in the config')
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if library == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:
            cfg.visualizer['save_dir'] = args.show_dir


def enable_tta(cfg: Config, library: str) -> None:
    """Wrap the model for test-time augmentation (mmdet adds a flip TTA when none is set)."""
    if library == 'mmseg':
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ToolError('--tta needs tta_model and tta_pipeline in an mmseg config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
        return
    if 'tta_model' not in cfg:
        warnings.warn('no tta_model in the config: using DetTTAModel with NMS 0.5', stacklevel=2)
        cfg.tta_model = dict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100),
        )
    if 'tta_pipeline' not in cfg:
        warnings.warn('no tta_pipeline in the config: using the test pipeline + flip', stacklevel=2)
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
        meta_keys = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                     'flip_direction')  # fmt: skip
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[
                [dict(type='RandomFlip', prob=1.0), dict(type='RandomFlip', prob=0.0)],
                [dict(type='PackDetInputs', meta_keys=meta_keys)],
            ],
        )
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def build_test_runner(args: argparse.Namespace):
    """The configured mmengine Runner, after every input check."""
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options)
    library = library_of(cfg)
    register_library(library)
    check_checkpoint_matches(cfg, args.checkpoint, library)
    check_dataset_folders(cfg, ('test_dataloader',))
    set_work_dir(cfg, args.work_dir, args.config)
    prepare_launcher(cfg, args.launcher)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, library, args)
    if args.tta:
        enable_tta(cfg, library)
    if args.out is not None and library == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.out is not None and library == 'mmdet':
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ToolError(f'--out must be a .pkl file for mmdet configs, got {args.out!r}')
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    return runner


def _json_value(value: object) -> float | str:
    """Numbers as floats (numpy scalars included), anything else (mmdet's copypaste) as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    metrics = build_test_runner(args).test()
    from mmengine.dist import is_main_process

    if args.metrics_json and is_main_process():
        folder = osp.dirname(osp.abspath(args.metrics_json))
        os.makedirs(folder, exist_ok=True)
        with open(args.metrics_json, 'w') as f:
            json.dump({key: _json_value(value) for key, value in metrics.items()}, f, indent=2)
    return metrics


if __name__ == '__main__':
    run_tool(main)
