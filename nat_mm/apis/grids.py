"""One picture per model family: a few validation images as rows of input | ground truth |
prediction, enlarged (nearest neighbour) so that outlines and class names leave the objects
visible, with a legend of the class colours.

Ground truth is read from the demo data's own files (COCO instances json, ADE label maps, COCO
panoptic PNGs); predictions come from an inferencer of :func:`nat_mm.apis.init_inferencer`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nat_mm.data.formats import rgb_to_id
from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes

FAMILIES = ('instances', 'semantic', 'panoptic')
SCALE = 3
# Fill of a segment over the image: things are outlined too, so their fill stays light.
THING_OPACITY = 0.45
STUFF_OPACITY = 0.75
_MARGIN = 6
_HEADER = 22
_FONT_SIZE = 12


@dataclass
class Segment:
    """One region to draw.

    Attributes:
        label: Index into the model's classes.
        mask: Pixels of the region, bool [H, W] at the image's size.
        is_thing: Outlined and named (objects); stuff and semantic classes are only filled.
        score: Detection score, drawn after the name, or None.
    """

    label: int
    mask: np.ndarray
    is_thing: bool
    score: float | None = None


def enlarge(array: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Nearest-neighbour enlargement of [H, W] or [H, W, C] by an integer factor."""
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the outline), bool [H, W]."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def draw_panel(image: np.ndarray, segments: list[Segment], classes, palette) -> Image.Image:
    """The enlarged image with every segment filled, things outlined and named."""
    canvas = enlarge(image).astype(np.float32)
    for segment in segments:
        colour = np.array(palette[segment.label], dtype=np.float32)
        mask = enlarge(segment.mask)
        opacity = THING_OPACITY if segment.is_thing else STUFF_OPACITY
        canvas[mask] = (1 - opacity) * canvas[mask] + opacity * colour
        if segment.is_thing:
            # Two pixels wide at the enlarged size: the outline stays thin next to the object.
            edge = _boundary(mask)
            edge |= _boundary(mask & ~edge)
            canvas[edge] = colour
    panel = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    font = _font()
    for segment in segments:
        if not segment.is_thing or not segment.mask.any():
            continue
        ys, xs = np.nonzero(segment.mask)
        text = classes[segment.label]
        if segment.score is not None:
            text += f' {segment.score:.2f}'
        # Above the object's top-left corner where there is room, inside it otherwise.
        x, y = int(xs.min()) * SCALE, int(ys.min()) * SCALE - _FONT_SIZE - 3
        y = max(y, 0)
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x, y), text, fill=tuple(int(c) for c in palette[segment.label]), font=font)
    return panel


def _legend(classes, palette, width: int) -> Image.Image:
    font = _font()
    legend = Image.new('RGB', (width, _HEADER), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    x = _MARGIN
    for name, colour in zip(classes, palette, strict=False):
        draw.rectangle((x, 5, x + 12, 17), fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((x + 16, 4), name, fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    return legend


def compose_grid(rows: list[list[Image.Image]], title: str, classes, palette) -> Image.Image:
    """Rows of equally sized panels under a title and column names, a legend below."""
    columns = ('input', 'ground truth', 'prediction')
    width, height = rows[0][0].size
    total_width = len(columns) * (width + _MARGIN) + _MARGIN
    total_height = 2 * _HEADER + len(rows) * (height + _MARGIN) + _HEADER
    grid = Image.new('RGB', (total_width, total_height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font()
    draw.text((_MARGIN, 4), title, fill=(0, 0, 0), font=font)
    for index, name in enumerate(columns):
        draw.text((_MARGIN + index * (width + _MARGIN), _HEADER + 4), name, fill=(0, 0, 0),
                  font=font)  # fmt: skip
    for row_index, row in enumerate(rows):
        for column_index, panel in enumerate(row):
            position = (
                _MARGIN + column_index * (width + _MARGIN),
                2 * _HEADER + row_index * (height + _MARGIN),
            )
            grid.paste(panel, position)
    grid.paste(_legend(classes, palette, total_width), (0, total_height - _HEADER))
    return grid


# Ground truth from the demo data's files --------------------------------------------------


def instance_ground_truth(ann_file: str, classes) -> dict[str, list[Segment]]:
    """COCO instances json -> {image file name: things}, labels by class name."""
    from pycocotools.coco import COCO

    coco = COCO(ann_file)
    names = {cat['id']: cat['name'] for cat in coco.loadCats(coco.getCatIds())}
    truth = {}
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        truth[info['file_name']] = [
            Segment(classes.index(names[ann['category_id']]), coco.annToMask(ann) > 0, True)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        ]
    return truth


def semantic_ground_truth(label_file: str, num_classes: int) -> list[Segment]:
    """ADE-style label map (0 = ignored, class i stored as i + 1) -> one segment per class."""
    labels = np.asarray(Image.open(label_file)).astype(np.int64) - 1
    return [Segment(c, labels == c, False) for c in range(num_classes) if (labels == c).any()]


def panoptic_ground_truth(ann_file: str, classes, thing_classes) -> dict[str, list[Segment]]:
    """COCO panoptic json + PNGs -> {image file name: segments}, labels by class name."""
    with open(ann_file) as f:
        panoptic = json.load(f)
    names = {cat['id']: cat['name'] for cat in panoptic['categories']}
    png_dir = os.path.splitext(ann_file)[0]
    files = {image['id']: image['file_name'] for image in panoptic['images']}
    truth = {}
    for annotation in panoptic['annotations']:
        ids = rgb_to_id(np.asarray(Image.open(os.path.join(png_dir, annotation['file_name']))))
        truth[files[annotation['image_id']]] = [
            Segment(
                classes.index(names[info['category_id']]),
                ids == info['id'],
                names[info['category_id']] in thing_classes,
            )
            for info in annotation['segments_info']
        ]
    return truth


# Predictions -------------------------------------------------------------------------------


def predicted_segments(
    family: str, inferencer, image: str, meta: dict, score_thr: float
) -> list[Segment]:
    """What the model predicts on one image, as segments of its classes."""
    result = inferencer(image, return_datasamples=True)
    # mmdet answers {'predictions': [sample]}; mmseg the sample of a single image itself.
    sample = result['predictions'][0] if isinstance(result, dict) else result
    if family == 'instances':
        instances = sample.pred_instances
        keep = instances.scores >= score_thr
        return [
            Segment(int(label), mask.numpy(), True, float(score))
            for label, mask, score in zip(
                instances.labels[keep], instances.masks[keep], instances.scores[keep], strict=True
            )
        ]
    if family == 'semantic':
        labels = sample.pred_sem_seg.data[0].numpy()
        return [Segment(c, labels == c, False) for c in np.unique(labels).tolist()]
    panoptic = sample.get('pred_panoptic_seg')
    if panoptic is None:  # an all-void map, dropped by nat_mm's inferencer (init_inferencer)
        return []
    from mmdet.evaluation.functional import INSTANCE_OFFSET  # ids: label + instance * offset

    ids = panoptic.sem_seg[0].numpy()
    num_classes = len(meta['classes'])
    segments = []
    for segment_id in np.unique(ids).tolist():
        label = segment_id % INSTANCE_OFFSET
        if label >= num_classes:  # void
            continue
        name = meta['classes'][label]
        segments.append(Segment(label, ids == segment_id, name in meta['thing_classes']))
    return segments


def paint_grid(
    family: str,
    inferencer,
    images: list[str],
    ground_truth: list[list[Segment]],
    out_file: str,
    title: str,
    score_thr: float = 0.3,
    force: bool = False,
) -> str:
    """Writes the grid of ``images`` (one row each) to ``out_file`` (PNG); returns its path.

    Args:
        family: 'instances' (boxes' masks with names and scores), 'semantic' or 'panoptic'.
        inferencer: From :func:`nat_mm.apis.init_inferencer`; its model's ``dataset_meta``
            (classes, palette) names and colours the segments.
        images: Image files.
        ground_truth: The segments of each image.
        out_file: The PNG to write.
        title: Written above the grid.
        score_thr: Detections below this score are not drawn.
        force: Replace an existing ``out_file``.

    Raises:
        NatMMError: An unknown family, no images, or ``out_file`` exists (without ``force``).
    """
    if family not in FAMILIES:
        raise NatMMError(f'the family must be one of {FAMILIES}, got {family!r}', 'family')
    if not images or len(images) != len(ground_truth):
        raise NatMMError('expected one ground truth per image, and at least one image', title)
    if os.path.exists(out_file) and not force:
        raise NatMMError('exists already; pass --force to overwrite it', out_file)
    meta = inferencer.model.dataset_meta
    classes, palette = list(meta['classes']), [tuple(c) for c in meta['palette']]
    rows = []
    for image, truth in zip(images, ground_truth, strict=True):
        pixels = np.asarray(Image.open(image).convert('RGB'))
        prediction = predicted_segments(family, inferencer, image, meta, score_thr)
        rows.append([
            Image.fromarray(enlarge(pixels)),
            draw_panel(pixels, truth, classes, palette),
            draw_panel(pixels, prediction, classes, palette),
        ])  # fmt: skip
    grid = compose_grid(rows, title, classes, palette)
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    buffer = BytesIO()
    grid.save(buffer, format='PNG')
    atomic_write_bytes(buffer.getvalue(), out_file)
    return out_file
