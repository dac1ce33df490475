"""Generate the embedded demo datasets (COCO instances + panoptic, ADE20K) with a progress bar.

    python tools/make_data.py [--out data/nat_mm_demo] [--num-train 400] [--num-val 50]
        [--size 128 128] [--seed 0] [--mask-format mixed] [--force]

An existing folder generated with the same settings is reused (use --force to rewrite it).
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.apis.datasets import generate_demo_data
from nat_mm.data import DemoDataSettings
from nat_mm.data.formats import MASK_FORMATS
from nat_mm.errors import NatMMError
from nat_mm.tools.cli import run

DEFAULT_ROOT = 'data/nat_mm_demo'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DemoDataSettings()
    parser = argparse.ArgumentParser(description='Generate the nat_mm demo datasets')
    parser.add_argument('--out', default=DEFAULT_ROOT, help='output folder')
    parser.add_argument('--num-train', type=int, default=defaults.num_train)
    parser.add_argument('--num-val', type=int, default=defaults.num_val)
    parser.add_argument(
        '--size', type=int, nargs=2, default=(defaults.height, defaults.width),
        metavar=('HEIGHT', 'WIDTH'),
    )  # fmt: skip
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--mask-format', choices=MASK_FORMATS, default=defaults.mask_format)
    parser.add_argument('--max-objects', type=int, default=defaults.max_objects)
    parser.add_argument('--force', action='store_true', help='rewrite an identical dataset')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def generate() -> None:
        try:
            settings = DemoDataSettings(
                num_train=args.num_train, num_val=args.num_val, height=args.size[0],
                width=args.size[1], seed=args.seed, mask_format=args.mask_format,
                max_objects=args.max_objects,
            )  # fmt: skip
        except ValueError as error:
            raise NatMMError(str(error), 'settings') from error
        generate_demo_data(args.out, settings, force=args.force)

    return run(generate)


if __name__ == '__main__':
    sys.exit(main())
