"""Write the embedded demo datasets (COCO instances, COCO panoptic, ADE20K) to disk.

Layout under ``root`` (the folder names the host libraries' base configs expect)::

    coco/train2017/*.jpg, coco/val2017/*.jpg
    coco/annotations/instances_{train,val}2017.json
    coco/annotations/panoptic_{train,val}2017.json, coco/annotations/panoptic_{train,val}2017/*.png
    ade/ADEChallengeData2016/images/{training,validation}/*.jpg
    ade/ADEChallengeData2016/annotations/{training,validation}/*.png
    demo_data.json   (the generation settings; a folder with the same settings is reused)

Every image is a pure function of (seed, split, index), so the data are reproducible and a
larger dataset starts with the images of a smaller one.
"""

from __future__ import annotations

import json
import os
import os.path as osp
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from nat_mm.fileio import atomic_write_bytes

from .formats import (
    MASK_FORMATS,
    ade_label_map,
    coco_categories,
    coco_instance_annotations,
    id_to_rgb,
    panoptic_segments,
)
from .scenes import make_scene

SPLITS = {'train': ('train2017', 'training'), 'val': ('val2017', 'validation')}
SETTINGS_FILE = 'demo_data.json'
ADE_SUBDIR = osp.join('ade', 'ADEChallengeData2016')
_SPLIT_SEED = {'train': 0, 'val': 1}
_JPEG_QUALITY = 95
# How scenes are drawn; a folder written by another version is regenerated, not reused.
# 2: each thing class has its own hue range (scenes.THING_HUES).
SCENE_VERSION = 2


@dataclass(frozen=True)
class DemoDataSettings:
    """What a demo dataset is generated from.

    Attributes:
        num_train: Training images.
        num_val: Validation images.
        height: Image height in pixels.
        width: Image width in pixels.
        seed: Base seed.
        mask_format: COCO instance masks: 'polygon', 'rle' or 'mixed'.
        max_objects: Objects per image are drawn from 1..max_objects.
        scene_version: How the scenes are drawn (:data:`SCENE_VERSION`).
    """

    num_train: int = 400
    num_val: int = 50
    height: int = 128
    width: int = 128
    seed: int = 0
    mask_format: str = 'mixed'
    max_objects: int = 4
    scene_version: int = SCENE_VERSION

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(
                f'num_train and num_val must be >= 1, got {self.num_train=}, {self.num_val=}'
            )
        if self.mask_format not in MASK_FORMATS:
            raise ValueError(f'mask_format must be one of {MASK_FORMATS}, got {self.mask_format=}')


def _write_json(data: dict, path: str) -> None:
    """Write JSON atomically, so an interrupted run never leaves a truncated annotation file."""
    atomic_write_bytes(json.dumps(data).encode(), path)


def _save_image(array: np.ndarray, path: str) -> None:
    """Save uint8 [H, W] or [H, W, 3]; JPEG for .jpg, lossless PNG otherwise."""
    image = Image.fromarray(array)
    if path.endswith('.jpg'):
        image.save(path, quality=_JPEG_QUALITY)
    else:
        image.save(path)


def _write_split(
    root: str,
    split: str,
    settings: DemoDataSettings,
    progress: Callable[[], None] | None,
) -> dict:
    """Render and write one split of all three datasets; return its image and object counts."""
    coco_split, ade_split = SPLITS[split]
    image_dir = osp.join(root, 'coco', coco_split)
    panoptic_dir = osp.join(root, 'coco', 'annotations', f'panoptic_{coco_split}')
    ade_image_dir = osp.join(root, ADE_SUBDIR, 'images', ade_split)
    ade_label_dir = osp.join(root, ADE_SUBDIR, 'annotations', ade_split)
    for folder in (image_dir, panoptic_dir, ade_image_dir, ade_label_dir):
        os.makedirs(folder, exist_ok=True)

    count = settings.num_train if split == 'train' else settings.num_val
    images, instances, panoptic = [], [], []
    for index in range(count):
        rng = np.random.default_rng([settings.seed, _SPLIT_SEED[split], index])
        scene = make_scene(rng, settings.height, settings.width, settings.max_objects)
        image_id = index + 1
        stem = f'{image_id:012d}'
        image_entry = {
            'id': image_id,
            'file_name': f'{stem}.jpg',
            'height': settings.height,
            'width': settings.width,
        }
        images.append(image_entry)
        _save_image(scene.image, osp.join(image_dir, f'{stem}.jpg'))

        instances += coco_instance_annotations(
            scene, image_id, len(instances) + 1, settings.mask_format
        )
        segment_ids, segments_info = panoptic_segments(scene, first_segment_id=1)
        _save_image(id_to_rgb(segment_ids), osp.join(panoptic_dir, f'{stem}.png'))
        panoptic.append({
            'image_id': image_id, 'file_name': f'{stem}.png', 'segments_info': segments_info
        })  # fmt: skip

        ade_stem = f'ADE_{ade_split}_{image_id:08d}'
        _save_image(scene.image, osp.join(ade_image_dir, f'{ade_stem}.jpg'))
        _save_image(ade_label_map(scene), osp.join(ade_label_dir, f'{ade_stem}.png'))
        if progress is not None:
            progress()

    annotation_dir = osp.join(root, 'coco', 'annotations')
    info = {'description': 'nat_mm demo shapes', 'version': '1.0'}
    _write_json(
        {'info': info, 'images': images, 'annotations': instances,
         'categories': coco_categories(with_stuff=False)},
        osp.join(annotation_dir, f'instances_{coco_split}.json'),
    )  # fmt: skip
    _write_json(
        {'info': info, 'images': images, 'annotations': panoptic,
         'categories': coco_categories(with_stuff=True)},
        osp.join(annotation_dir, f'panoptic_{coco_split}.json'),
    )  # fmt: skip
    return {'images': count, 'objects': len(instances)}


def read_settings(root: str) -> DemoDataSettings | None:
    """The settings a complete dataset under ``root`` was generated with, or None."""
    path = osp.join(root, SETTINGS_FILE)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        stored = json.load(f)
    stored.setdefault('scene_version', 1)  # written before the version was recorded
    return DemoDataSettings(**stored)


def generate_demo_datasets(
    root: str,
    settings: DemoDataSettings,
    progress: Callable[[], None] | None = None,
    force: bool = False,
) -> dict:
    """Generate the demo datasets under ``root`` unless they already exist with these settings.

    Args:
        root: Output folder (created if missing).
        settings: What to generate.
        progress: Called once per generated image (train and val), e.g. to advance a bar.
        force: Regenerate even if ``root`` holds a dataset with the same settings.

    Raises:
        ValueError: ``root`` holds ``coco/`` or ``ade/`` folders not written by this generator,
            or ``settings`` asks for another scene version.

    Returns:
        ``{'train': {'images': n, 'objects': m}, 'val': {...}, 'reused': bool}``.
    """
    if settings.scene_version != SCENE_VERSION:
        raise ValueError(
            f'this generator draws scene_version={SCENE_VERSION}, got {settings.scene_version=}'
        )
    previous = read_settings(root)
    if not force and previous == settings:
        return {'reused': True}
    outputs = [osp.join(root, 'coco'), osp.join(root, 'ade')]
    settings_path = osp.join(root, SETTINGS_FILE)
    if previous is None and any(osp.exists(path) for path in outputs):
        # Never delete a folder this generator did not write (it may hold the real COCO).
        raise ValueError(
            f'root={root!r} holds coco/ or ade/ but no {SETTINGS_FILE}; '
            'refusing to overwrite data the demo generator did not write'
        )
    # Removed first: a run interrupted mid-way must not look complete, and images of a
    # larger earlier dataset must not linger (mmseg lists the ADE folders, not a json).
    if osp.exists(settings_path):
        os.remove(settings_path)
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    summary: dict = {'reused': False}
    for split in SPLITS:
        summary[split] = _write_split(root, split, settings, progress)
    _write_json(asdict(settings), settings_path)
    return summary
