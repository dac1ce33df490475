"""Run a trained mmdet or mmseg model on an image or a folder and save painted predictions.

Detection configs get boxes, class names, scores and instance masks (mmdet's
``DetLocalVisualizer``); segmentation configs get the class map blended over the image (mmseg's
``SegLocalVisualizer``). One PNG per input image is written to ``--out-dir``.

    python tools/demo.py CONFIG CHECKPOINT INPUT [--out-dir DIR] [--device cpu]
        [--score-thr 0.3] [--opacity 0.5] [--limit N] [--cfg-options KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import os.path as osp

import numpy as np
from mmengine.config import DictAction

from nat_mm.tools_common import (
    ToolError,
    check_checkpoint_matches,
    library_of,
    load_config,
    register_library,
    run_tool,
)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Paint a model's predictions on images")
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('input', help='an image file or a folder of images')
    parser.add_argument('--out-dir', default='outputs/demo', help='where the pictures go')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda:0' ...")
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection score threshold')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation map opacity')
    parser.add_argument('--limit', type=int, help='paint at most this many images')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='override config settings'
    )
    return parser.parse_args(argv)


def list_images(path: str, limit: int | None) -> list[str]:
    """The image files of ``path`` (a file, or a folder's images sorted by name).

    Raises:
        ToolError: ``path`` does not exist, or the folder holds no image.
    """
    if osp.isfile(path):
        return [path]
    if not osp.isdir(path):
        raise ToolError(f'input {path!r} is neither an image file nor a folder')
    images = sorted(
        osp.join(path, name) for name in os.listdir(path) if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not images:
        raise ToolError(f'input folder {path!r} holds no image ({", ".join(IMAGE_EXTENSIONS)})')
    return images[:limit] if limit else images


def read_image(path: str) -> np.ndarray:
    """BGR uint8 [H, W, 3] (OpenMMLab's convention).

    Raises:
        ToolError: The file cannot be decoded as an image.
    """
    import mmcv

    try:
        image = mmcv.imread(path)
    except Exception as error:
        raise ToolError(f'cannot read image {path!r}: {error}') from error
    if image is None:
        raise ToolError(f'cannot read image {path!r}: not a decodable image file')
    return image


def paint_predictions(args: argparse.Namespace) -> list[str]:
    """Run the model on every input image; return the written picture paths."""
    cfg = load_config(args.config, args.cfg_options)
    library = library_of(cfg)
    register_library(library)
    check_checkpoint_matches(cfg, args.checkpoint, library)
    images = list_images(args.input, args.limit)
    if library == 'mmdet':
        from mmdet.apis import inference_detector as infer
        from mmdet.apis import init_detector as init_model
        from mmdet.registry import VISUALIZERS
    else:
        from mmseg.apis import inference_model as infer
        from mmseg.apis import init_model
        from mmseg.registry import VISUALIZERS

    model = init_model(cfg, args.checkpoint, device=args.device)
    cfg.visualizer.name = f'demo_visualizer_{os.getpid()}'
    visualizer = VISUALIZERS.build(cfg.visualizer)
    visualizer.dataset_meta = model.dataset_meta
    os.makedirs(args.out_dir, exist_ok=True)
    written = []
    for path in images:
        image = read_image(path)
        result = infer(model, image)
        out_file = osp.join(args.out_dir, osp.splitext(osp.basename(path))[0] + '.png')
        draw_options = dict(pred_score_thr=args.score_thr) if library == 'mmdet' else {}
        if library == 'mmseg':
            visualizer.alpha = args.opacity
        visualizer.add_datasample(
            osp.basename(path),
            image[..., ::-1],  # the visualizers draw on RGB
            data_sample=result,
            draw_gt=False,
            show=False,
            out_file=out_file,
            **draw_options,
        )
        written.append(out_file)
    print(f'wrote {len(written)} pictures to {args.out_dir}')
    return written


def main(argv: list[str] | None = None) -> list[str]:
    return paint_predictions(parse_args(argv))


if __name__ == '__main__':
    run_tool(main)
