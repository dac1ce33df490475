"""The main job (``make demo``): demo data, then evaluate untrained, train, evaluate and paint a
Mask R-CNN + NAT, an UPerNet + DiNAT and a Mask2Former + NAT, and print a summary
(:mod:`nat_mm.apis.main_job` says what each step does).

    python tools/main_job.py [--work-dir work_dirs/main_job] [--data-root data/nat_mm_demo]
        [--det-iters N] [--seg-iters N] [--pan-iters N] [--num-train N] [--num-val N]
        [--pictures N] [--force]
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.apis.main_job import MainJobSettings, run_main_job
from nat_mm.tools.cli import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = MainJobSettings()
    parser = argparse.ArgumentParser(
        description='nat_mm main job: demo data; three models evaluated untrained, trained, '
        'evaluated and painted'
    )
    parser.add_argument('--work-dir', default=defaults.work_dir)
    parser.add_argument('--data-root', default=defaults.data_root)
    parser.add_argument('--num-train', type=int, default=defaults.num_train)
    parser.add_argument('--num-val', type=int, default=defaults.num_val)
    parser.add_argument('--det-iters', type=int, help='detector iterations (config default)')
    parser.add_argument('--seg-iters', type=int, help='segmentor iterations (config default)')
    parser.add_argument('--pan-iters', type=int, help='Mask2Former iterations (config default)')
    parser.add_argument('--pictures', type=int, default=defaults.pictures, help='images to paint')
    parser.add_argument('--force', action='store_true', help="replace an earlier run's files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = MainJobSettings(
        work_dir=args.work_dir, data_root=args.data_root, num_train=args.num_train,
        num_val=args.num_val, det_iters=args.det_iters, seg_iters=args.seg_iters,
        pan_iters=args.pan_iters, pictures=args.pictures, force=args.force,
    )  # fmt: skip
    return run(lambda: run_main_job(settings))


if __name__ == '__main__':
    sys.exit(main())
