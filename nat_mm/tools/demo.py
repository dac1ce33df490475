"""Run a trained mmdet or mmseg model on an image or a folder and save painted predictions.

Detection configs get boxes, class names, scores and instance masks; segmentation configs get
the class map blended over the image. One PNG per input image is written to ``--out-dir``
(``NAME.png``; ``NAME_EXT.png`` where two inputs share a name). The checkpoint may be a path or an
``http(s)://`` URL; it is read without running code from it and loaded strictly.

    python tools/demo.py CONFIG CHECKPOINT INPUT [--out-dir DIR] [--device cpu]
        [--score-thr 0.3] [--opacity 0.5] [--limit N] [--cfg-options KEY=VALUE ...]
        [--trust-checkpoint] [--force]
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.apis.inference import init_inferencer, list_images, paint_predictions
from nat_mm.tools.cli import add_cfg_options, add_force, add_sha256, add_trust, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Paint a model's predictions on images")
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file or http(s) URL')
    parser.add_argument('input', help='an image file or a folder of images')
    parser.add_argument('--out-dir', default='outputs/demo', help='where the pictures go')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda:0' ...")
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection score threshold')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation map opacity')
    parser.add_argument('--limit', type=int, help='paint at most this many images')
    add_cfg_options(parser)
    add_trust(parser)
    add_sha256(parser)
    add_force(parser, 'existing pictures')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def paint() -> None:
        images = list_images(args.input, args.limit)
        inferencer = init_inferencer(
            args.config, args.checkpoint, args.device, args.cfg_options, args.trust_checkpoint,
            args.sha256,
        )  # fmt: skip
        paint_predictions(
            inferencer, images, args.out_dir, args.score_thr, args.opacity, args.force
        )

    return run(paint)


if __name__ == '__main__':
    sys.exit(main())
