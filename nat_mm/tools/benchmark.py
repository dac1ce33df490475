"""Speed and peak memory of a NAT / DiNAT model next to its Swin-T peer, measured the same way.

    python tools/benchmark.py --backbone nat-tiny --shape 800 1216
    python tools/benchmark.py configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_amp-1x_coco.py \\
        --shape 800 1216
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--batch 1] [--warmup 1]
        [--iters 3] [--modes infer train] [--threads N] [--profile]

What is measured and how: :mod:`nat_mm.analysis.benchmark`.
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.analysis.benchmark import DTYPES, MODES, benchmark
from nat_mm.ops.backends import backend_names
from nat_mm.tools.cli import run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark a NAT/DiNAT model against Swin-T')
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config (or use --backbone)')
    parser.add_argument('--backbone', help="bare backbone preset, e.g. 'nat-tiny', 'dinat-small'")
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--dtype', choices=DTYPES, default='float32', help='bfloat16 / float16: under autocast'
    )
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument(
        '--attn-backend',
        choices=backend_names(),
        help='NAT/DiNAT na2d backend (default: automatic)',
    )
    parser.add_argument('--threads', type=int, help='torch intra-op threads (default: torch)')
    parser.add_argument('--no-peer', action='store_true', help='measure the subject only')
    parser.add_argument('--profile', action='store_true', help='print where the time goes')
    parser.add_argument('--json', help='also write the rows as JSON to this file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: benchmark(
        args.config, args.backbone, tuple(args.shape), args.batch, args.device, args.dtype,
        args.warmup, args.iters, tuple(args.modes), args.attn_backend, args.threads,
        not args.no_peer, args.profile, args.json,
    ))  # fmt: skip


if __name__ == '__main__':
    sys.exit(main())
