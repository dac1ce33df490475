"""Export a NAT / DiNAT backbone, or an mmdet / mmseg model's network, to ONNX or an
ExportedProgram; check it against eager PyTorch and time both, next to Swin-T.

    python tools/export.py --backbone nat-tiny [--checkpoint PATH] --shape 512 512 \\
        --out nat_tiny.onnx
    python tools/export.py CONFIG [CHECKPOINT] --shape 512 512 --out model.onnx \\
        [--format onnx|exported-program] [--dynamic] [--features]

What is exported, and what stays with the user (decoding, NMS, resizing): :mod:`nat_mm.apis.export`.
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.apis.export import FORMATS, build_network, export_and_check
from nat_mm.tools.cli import add_cfg_options, add_force, add_trust, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a NAT / DiNAT network to ONNX or an ExportedProgram and check it '
        'against eager PyTorch (max abs / rel error, latency, Swin-T alongside).'
    )
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config (or use --backbone)')
    parser.add_argument('checkpoint', nargs='?', help="the config's checkpoint (strict)")
    parser.add_argument('--backbone', help="bare backbone preset, e.g. 'nat-tiny', 'dinat-small'")
    parser.add_argument('--checkpoint', dest='backbone_checkpoint', help='--backbone: weights')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'))
    parser.add_argument('--out', required=True, help='the file to write (.onnx or .pt2)')
    parser.add_argument('--format', choices=FORMATS, default='onnx')
    parser.add_argument('--dynamic', action='store_true', help='symbolic H and W')
    parser.add_argument(
        '--features', action='store_true', help='a config: its backbone + neck, not tensor mode'
    )
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per latency')
    parser.add_argument('--no-peer', action='store_true', help='skip Swin-T (backbones only)')
    add_cfg_options(parser)
    add_trust(parser)
    add_force(parser, 'the output file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> None:
        from nat_mm.errors import NatMMError

        if args.checkpoint and args.backbone_checkpoint:
            raise NatMMError('give the checkpoint once', '--checkpoint')
        network, name = build_network(
            args.config, args.checkpoint or args.backbone_checkpoint, args.backbone,
            args.features, args.cfg_options, args.trust_checkpoint,
        )  # fmt: skip
        peer = None
        if args.backbone and not args.no_peer:
            from nat_mm.analysis.benchmark import swin_tiny

            peer = swin_tiny(tuple(args.shape))
            peer.eval()  # not chained: mmdet's SwinTransformer.train() returns None
        report = export_and_check(
            network, name, tuple(args.shape), args.out, args.format, args.dynamic, args.force,
            args.repeats, peer,
        )  # fmt: skip
        height, width = args.shape
        size_note = 'dynamic H and W' if report['dynamic'] else f'fixed {height} x {width}'
        if args.dynamic and not report['dynamic']:
            size_note += ' (the exporter specialized the size: the file holds at it only)'
        print(f'Wrote {report["out"]} ({args.format}, {size_note})')
        print(f'Input 1 x 3 x {height} x {width}; latency: median of {args.repeats} runs')
        print('| model | runtime | eager ms | runtime ms | max abs err | max rel err |')
        print('|---|---|---|---|---|---|')
        for row in report['rows']:
            print(
                f'| {row["name"]} | {row["runtime"]} | {row["eager_ms"]:.1f} | '
                f'{row["runtime_ms"]:.1f} | {row["max_abs"]:.2e} | {row["max_rel"]:.2e} |'
            )

    return run(work)


if __name__ == '__main__':
    sys.exit(main())
