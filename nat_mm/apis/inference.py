"""Inference on images through mmdet's ``DetInferencer`` / mmseg's ``MMSegInferencer``, with the
checkpoint read by nat_mm's safe loader and loaded strictly, and pictures of the predictions.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from nat_mm.apis.config import library_of, load_config, register_library
from nat_mm.apis.datasets import IMAGE_EXTENSIONS
from nat_mm.checkpoint import load_checkpoint, load_model_state
from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes


def _safe_inferencer_class(base: type, library: str) -> type:
    """``base`` (an mmengine inferencer) fed with a checkpoint read beforehand by nat_mm.

    The inferencer is built with ``weights=None``; its documented extension point
    ``_load_weights_to_model`` then gets the checkpoint nat_mm read safely, brings a file of
    another layout (mmdet 2.x / mmseg 0.x, detectron2) to the host's, checks it strictly and
    lets the library take the class names and palette from its ``dataset_meta`` as usual.
    """

    class SafeInferencer(base):
        nat_mm_library = library

        def __init__(self, cfg: Any, checkpoint: Any, source: str, device: str) -> None:
            self._nat_mm_checkpoint = (checkpoint, source)
            super().__init__(model=cfg, weights=None, device=device)

        def _load_weights_to_model(self, model, checkpoint, cfg) -> None:
            checkpoint, source = self._nat_mm_checkpoint
            host_checkpoint = load_model_state(model, checkpoint, source)
            super()._load_weights_to_model(model, host_checkpoint, cfg)

        def visualize(self, inputs, preds, **kwargs):
            if library == 'mmdet':
                # mmdet's panoptic drawing fails on a map without any segment (every pixel
                # void, as an untrained model predicts): such a prediction shows the bare image.
                void = len(self.model.dataset_meta['classes'])
                for pred in preds:
                    panoptic = pred.get('pred_panoptic_seg')
                    if panoptic is not None and (panoptic.sem_seg == void).all():
                        del pred.pred_panoptic_seg
            return super().visualize(inputs, preds, **kwargs)

    SafeInferencer.__name__ = SafeInferencer.__qualname__ = f'Safe{base.__name__}'
    return SafeInferencer


def init_inferencer(
    config: str,
    checkpoint: str,
    device: str = 'cpu',
    cfg_options: dict | None = None,
    trust: bool = False,
    sha256: str | None = None,
):
    """An mmdet ``DetInferencer`` or mmseg ``MMSegInferencer`` (from the config's scope).

    Args:
        config: Config file.
        checkpoint: Checkpoint path or ``http(s)://`` URL (downloaded once).
        device: 'cpu', 'cuda', 'cuda:1', ...
        cfg_options: Config overrides.
        trust: Allow full unpickling of the checkpoint (only for files you trust).
        sha256: Expected SHA-256 of the checkpoint file, or None.

    Raises:
        NatMMError: Bad config, unreadable / unsafe checkpoint, or weights that do not fit.
    """
    cfg = load_config(config, cfg_options)
    library = library_of(cfg)
    register_library(library)
    weights = load_checkpoint(checkpoint, trust=trust, sha256=sha256)
    if library == 'mmdet':
        from mmdet.apis import DetInferencer as base
    else:
        from mmseg.apis import MMSegInferencer as base
    inferencer = _safe_inferencer_class(base, library)(cfg, weights, checkpoint, device)
    inferencer.show_progress = False  # paint_predictions shows one bar for all images
    return inferencer


def list_images(path: str, limit: int | None = None) -> list[str]:
    """The image files of ``path``: the file itself, or a folder's images sorted by name.

    Raises:
        NatMMError: ``path`` does not exist, or the folder holds no image.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise NatMMError('the input is neither an image file nor a folder', path)
    images = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not images:
        raise NatMMError(f'the input folder holds no image ({", ".join(IMAGE_EXTENSIONS)})', path)
    return images[:limit] if limit else images


def picture_names(images: list[str]) -> list[str]:
    """One distinct PNG name per input: ``NAME.png``, or ``NAME_EXT.png`` where two inputs share
    a name (``a.jpg`` and ``a.png`` become ``a_jpg.png`` and ``a_png.png``)."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in images]
    names = []
    for path, stem in zip(images, stems, strict=True):
        if stems.count(stem) > 1:
            stem = os.path.basename(path).replace('.', '_')
        names.append(f'{stem}.png')
    if len(set(names)) != len(names):  # same file names from different folders
        raise NatMMError('two inputs would write the same picture', ', '.join(images))
    return names


def _check_decodable(path: str) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise NatMMError(f'cannot read the image: {error}', path) from error


def paint_predictions(
    inferencer: Any,
    images: list[str],
    out_dir: str,
    score_thr: float = 0.3,
    opacity: float = 0.5,
    force: bool = False,
) -> list[str]:
    """Runs the model on every image and writes one PNG of its predictions per image.

    ``inferencer`` comes from :func:`init_inferencer`.

    Detection: boxes, class names, scores and masks (mmdet's ``DetLocalVisualizer``);
    segmentation: the class map over the image (mmseg's ``SegLocalVisualizer``).

    Returns:
        The written pictures, in the order of ``images``.

    Raises:
        NatMMError: ``out_dir`` is a file, a picture exists (without ``force``), or an image
            cannot be read; all checked before the first image is processed.
    """
    import cv2
    from mmengine.utils import ProgressBar

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NatMMError('is a file, expected a folder', f'--out-dir {out_dir}')
    outputs = [os.path.join(out_dir, name) for name in picture_names(images)]
    existing = [path for path in outputs if os.path.exists(path)]
    if existing and not force:
        raise NatMMError(
            f'{len(existing)} pictures exist already ({existing[0]}, ...); pass --force to '
            'overwrite them',
            f'--out-dir {out_dir}',
        )
    for path in images:
        _check_decodable(path)
    is_detector = inferencer.nat_mm_library == 'mmdet'
    options = dict(pred_score_thr=score_thr) if is_detector else dict(opacity=opacity)
    bar = ProgressBar(len(images))
    for path, output in zip(images, outputs, strict=True):
        result = inferencer(path, return_vis=True, no_save_vis=True, **options) if is_detector \
            else inferencer(path, return_vis=True, **options)  # fmt: skip
        picture = result['visualization']
        if isinstance(picture, list):  # mmdet returns a list; mmseg unwraps a single picture
            (picture,) = picture
        picture = np.ascontiguousarray(picture[..., ::-1])  # RGB -> BGR
        encoded, data = cv2.imencode('.png', picture)
        if not encoded:
            raise NatMMError('cannot encode the picture as PNG', output)
        atomic_write_bytes(data.tobytes(), output)
        bar.update()
    print(f'\nwrote {len(outputs)} pictures to {out_dir}')
    return outputs
