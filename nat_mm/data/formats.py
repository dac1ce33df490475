"""Encoders from a :class:`Scene` to the real dataset formats.

- COCO instances: ``bbox`` [x, y, w, h], ``area``, ``segmentation`` as a polygon list or an
  uncompressed RLE (``counts`` list, column-major, starting with a run of zeros).
- COCO panoptic: segment ids encoded as RGB (``id = R + 256 G + 256^2 B``), 0 = void.
- ADE20K: uint8 label map, 0 = "other" (ignored with ``reduce_zero_label``), class i -> i + 1.
"""

from __future__ import annotations

import numpy as np

from .scenes import STUFF_CLASSES, THING_CLASSES, Scene

MASK_FORMATS = ('polygon', 'rle', 'mixed')
# COCO category ids: things first (as in instances json), then stuff (panoptic only).
THING_CATEGORY_IDS = tuple(range(1, len(THING_CLASSES) + 1))
_FIRST_STUFF_ID = len(THING_CLASSES) + 1
STUFF_CATEGORY_IDS = tuple(range(_FIRST_STUFF_ID, _FIRST_STUFF_ID + len(STUFF_CLASSES)))


def coco_categories(with_stuff: bool) -> list[dict]:
    """COCO ``categories`` entries; ``isthing`` is added for the panoptic flavour."""
    categories = [
        {'id': cat_id, 'name': name, 'supercategory': 'shape'}
        for cat_id, name in zip(THING_CATEGORY_IDS, THING_CLASSES, strict=True)
    ]
    if not with_stuff:
        return categories
    for category in categories:
        category['isthing'] = 1
    categories += [
        {'id': cat_id, 'name': name, 'supercategory': 'background', 'isthing': 0}
        for cat_id, name in zip(STUFF_CATEGORY_IDS, STUFF_CLASSES, strict=True)
    ]
    return categories


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool mask [H, W] (column-major runs, first run is zeros)."""
    flat = mask.astype(np.uint8).flatten(order='F')
    change_points = np.flatnonzero(np.diff(flat)) + 1
    boundaries = np.concatenate([[0], change_points, [flat.size]])
    runs = np.diff(boundaries).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {'size': [int(mask.shape[0]), int(mask.shape[1])], 'counts': runs}


def mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight COCO box [x, y, w, h] of a non-empty bool mask [H, W]."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]  # fmt: skip


def coco_instance_annotations(
    scene: Scene, image_id: int, first_annotation_id: int, mask_format: str
) -> list[dict]:
    """COCO ``annotations`` entries of one scene.

    Args:
        scene: The scene.
        image_id: The image's COCO id.
        first_annotation_id: Id of the first annotation; the following ones count up.
        mask_format: 'polygon', 'rle', or 'mixed' (alternating by annotation id).

    Returns:
        One dict per object, in the scene's order.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f'mask_format must be one of {MASK_FORMATS}, got {mask_format=}')
    annotations = []
    for offset, obj in enumerate(scene.objects):
        annotation_id = first_annotation_id + offset
        use_rle = mask_format == 'rle' or (mask_format == 'mixed' and annotation_id % 2 == 1)
        if use_rle:
            segmentation = mask_to_uncompressed_rle(obj.mask)
        else:
            segmentation = [np.round(obj.polygon, 2).flatten().tolist()]
        annotations.append({
            'id': annotation_id,
            'image_id': image_id,
            'category_id': THING_CATEGORY_IDS[obj.label],
            'bbox': mask_bbox(obj.mask),
            'area': float(obj.mask.sum()),
            'segmentation': segmentation,
            'iscrowd': 0,
        })  # fmt: skip
    return annotations


def panoptic_segments(scene: Scene, first_segment_id: int) -> tuple[np.ndarray, list[dict]]:
    """Panoptic id map and ``segments_info`` of one scene.

    Args:
        scene: The scene.
        first_segment_id: Id of the first segment; the following ones count up.

    Returns:
        ids: Segment id of every pixel, int64 [H, W] (0 = void: clutter).
        segments_info: One dict per non-empty thing or stuff segment.
    """
    ids = np.zeros(scene.stuff_map.shape, dtype=np.int64)
    segments = []
    regions = [(THING_CATEGORY_IDS[obj.label], obj.mask) for obj in scene.objects]
    things = np.zeros_like(scene.clutter_mask)
    for obj in scene.objects:
        things |= obj.mask
    for stuff_index, cat_id in enumerate(STUFF_CATEGORY_IDS):
        region = (scene.stuff_map == stuff_index) & ~things & ~scene.clutter_mask
        regions.append((cat_id, region))
    for category_id, region in regions:
        if not region.any():
            continue
        segment_id = first_segment_id + len(segments)
        ids[region] = segment_id
        segments.append({
            'id': segment_id,
            'category_id': category_id,
            'area': int(region.sum()),
            'bbox': mask_bbox(region),
            'iscrowd': 0,
        })  # fmt: skip
    return ids, segments


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Encode segment ids int [H, W] as a COCO panoptic RGB image uint8 [H, W, 3]."""
    if ids.min() < 0 or ids.max() >= 256**3:
        raise ValueError(f'segment ids must be in [0, 256**3), got range {ids.min()}..{ids.max()}')
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Decode a COCO panoptic RGB image uint8 [H, W, 3] into segment ids int64 [H, W]."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def ade_label_map(scene: Scene) -> np.ndarray:
    """ADE20K-style label map uint8 [H, W]: 0 = other (clutter), stuff then things from 1."""
    labels = scene.stuff_map.astype(np.uint8) + 1
    for obj in scene.objects:
        labels[obj.mask] = len(STUFF_CLASSES) + obj.label + 1
    labels[scene.clutter_mask] = 0
    return labels


def ade_classes() -> tuple[str, ...]:
    """Class names of the ADE-style maps, in label order after ``reduce_zero_label``."""
    return STUFF_CLASSES + THING_CLASSES
