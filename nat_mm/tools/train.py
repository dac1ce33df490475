"""Train an mmdet or mmseg model (NAT / DiNAT backbones included) from a config.

Same behaviour and flags as mmdet's and mmseg's ``tools/train.py`` (the library is chosen from
the config's ``default_scope``), with nat_mm's runtime: checkpoints saved crash-safely, read
without running code, ``--resume`` from the newest complete one. Runs distributed on CPUs too.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
        [--auto-scale-lr] [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm]
        [--trust-checkpoint] [--force]
"""

from __future__ import annotations

import argparse
import os
import sys

from nat_mm.apis.runners import build_train_runner
from nat_mm.tools.cli import add_cfg_options, add_force, add_launcher, add_trust, run


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
        const=True,
        default=False,
        help='resume from this checkpoint, or without a value from the newest complete one of '
        'the work dir',
    )
    add_cfg_options(parser)
    add_launcher(parser)
    add_trust(parser)
    add_force(parser, "an earlier run's checkpoints in the work dir (start over)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))

    def train() -> None:
        runner = build_train_runner(
            args.config, work_dir=args.work_dir, resume=args.resume, amp=args.amp,
            auto_scale_lr=args.auto_scale_lr, cfg_options=args.cfg_options,
            launcher=args.launcher, trust=args.trust_checkpoint, force=args.force,
        )  # fmt: skip
        runner.train()

    return run(train)


if __name__ == '__main__':
    sys.exit(main())
