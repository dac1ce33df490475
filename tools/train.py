"""Train an mmdet or mmseg model (NAT / DiNAT backbones included) from a config.

Same behaviour and flags as mmdet's and mmseg's ``tools/train.py``; the library is chosen from
the config's ``default_scope``. Also runs distributed on CPUs (gloo) and saves checkpoints
atomically, so ``--resume`` after a crash always finds a complete checkpoint.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
        [--auto-scale-lr] [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]
"""

from __future__ import annotations

import argparse
import os.path as osp

from mmengine.config import DictAction

from nat_mm.tools_common import (
    ToolError,
    check_amp_possible,
    check_dataset_folders,
    enable_amp,
    library_of,
    load_config,
    prepare_launcher,
    register_library,
    run_tool,
    set_local_rank,
    set_work_dir,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector or segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (GPU)')
    parser.add_argument(
        '--auto-scale-lr', action='store_true', help='scale the lr by the total batch size'
    )
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint, or without a value from the latest one in work_dir',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (e.g. train_cfg.max_iters=100)',
    )
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


def build_train_runner(args: argparse.Namespace):
    """The configured mmengine Runner, after every input check."""
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options)
    library = library_of(cfg)
    check_amp_possible(args.amp)
    register_library(library)
    check_dataset_folders(cfg, ('train_dataloader', 'val_dataloader'))
    set_work_dir(cfg, args.work_dir, args.config)
    prepare_launcher(cfg, args.launcher)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ToolError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise ToolError(f'--resume checkpoint {args.resume!r} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def main(argv: list[str] | None = None) -> None:
    build_train_runner(parse_args(argv)).train()


if __name__ == '__main__':
    run_tool(main)
