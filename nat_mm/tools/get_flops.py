"""Parameters and GFLOPs of a NAT / DiNAT model: a whole mmdet / mmseg config or a bare backbone.

    python tools/get_flops.py configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py
    python tools/get_flops.py \\
        configs/mmseg/nat/nat-mini-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py --shape 512 512
    python tools/get_flops.py --backbone nat-tiny --shape 224

"GFLOPs" are GMACs, as fvcore, mmdet, mmseg and the NAT papers count them; the conventions
(which heads run, the default shapes) are in :mod:`nat_mm.analysis.flops`.
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.analysis.flops import MASK_ROIS, measure_flops
from nat_mm.tools.cli import add_cfg_options, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Params and GFLOPs (= GMACs, the fvcore / mmdet / mmseg convention) of a '
        'NAT / DiNAT config or bare backbone, on a synthetic image.'
    )
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config file')
    parser.add_argument('--backbone', help='bare backbone instead of a config, e.g. nat-tiny')
    parser.add_argument('--kernel-size', type=int, help='bare backbone: neighborhood size')
    parser.add_argument('--dilations', help='bare DiNAT backbone: schedule name, e.g. coco')
    parser.add_argument('--shape', type=int, nargs='+', help='input size: S or H W')
    add_cfg_options(parser)
    parser.add_argument(
        '--all-mask-rois',
        action='store_true',
        help='Cascade Mask R-CNN: run the mask heads on every proposal, as mmdet 3.x tensor mode '
        f'does, instead of the first {MASK_ROIS} (the published counts)',
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def report() -> None:
        result = measure_flops(
            args.config, args.backbone, tuple(args.shape) if args.shape else None,
            args.cfg_options, args.kernel_size, args.dilations, args.all_mask_rois,
        )  # fmt: skip
        height, width = result['shape']
        print(f'Model:  {result["name"]}')
        print(f'Input:  1 x 3 x {height} x {width} (H x W)')
        print(f'Params: {result["params"] / 1e6:.2f} M')
        print(f'GFLOPs: {result["macs"] / 1e9:.2f} (GMACs: one multiply-add = one FLOP, as fvcore)')
        if result['uncounted']:
            ops = ', '.join(f'{op} x{n}' for op, n in sorted(result['uncounted'].items()))
            print(f'Not counted (no FLOP handle, usually negligible): {ops}')

    return run(report)


if __name__ == '__main__':
    sys.exit(main())
