"""Test (evaluate) an mmdet or mmseg model from a config and a checkpoint.

Same behaviour and flags as mmdet's and mmseg's ``tools/test.py`` (the library is chosen from
the config's ``default_scope``). The checkpoint (a path or an ``http(s)://`` URL) is read without
running code from it and loaded strictly: any missing, unexpected, mis-shaped or non-finite
weight is reported before the evaluation.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--tta]
        [--out FILE_OR_DIR] [--metrics-json FILE] [--cfg-options KEY=VALUE ...]
        [--launcher none|pytorch|slurm] [--trust-checkpoint] [--force]
"""

from __future__ import annotations

import argparse
import os
import sys

from nat_mm.apis.runners import build_test_runner, run_test
from nat_mm.tools.cli import add_cfg_options, add_force, add_launcher, add_sha256, add_trust, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector or segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file or http(s) URL')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument(
        '--out', help='mmdet: dump predictions to this .pkl; mmseg: save prediction PNGs here'
    )
    parser.add_argument('--metrics-json', help='also write the metrics to this JSON file')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='save painted predictions in this dir')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    add_cfg_options(parser)
    add_launcher(parser)
    add_trust(parser)
    add_sha256(parser)
    add_force(parser, 'an existing --out / --metrics-json file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))

    def test() -> None:
        runner = build_test_runner(
            args.config, args.checkpoint, work_dir=args.work_dir, out=args.out, show=args.show,
            show_dir=args.show_dir, wait_time=args.wait_time, tta=args.tta,
            cfg_options=args.cfg_options, launcher=args.launcher, trust=args.trust_checkpoint,
            force=args.force, metrics_json=args.metrics_json, sha256=args.sha256,
        )  # fmt: skip
        run_test(runner, args.metrics_json)

    return run(test)


if __name__ == '__main__':
    sys.exit(main())
