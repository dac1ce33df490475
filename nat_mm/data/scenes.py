"""Seeded synthetic scenes: coloured shapes (each class its own hue range) on textured two-region
backgrounds.

A scene is what every dataset format is written from: an RGB image, the exact polygon and
pixel mask of each object ("thing"), a per-pixel map of the two background regions
("stuff": wall above a random horizon, floor below) and a mask of unlabelled clutter blobs.
Objects never overlap, so every polygon is also the object's visible outline.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

THING_CLASSES = ('circle', 'square', 'triangle')
STUFF_CLASSES = ('wall', 'floor')
# Hue range in degrees of each thing class (reds, greens, blues), saturation and value vary: a
# class has a typical appearance, as real categories do. With colours independent of the class,
# only the outline tells a square from a circle, and a from-scratch segmentor (DiNAT or
# ResNet-18 UPerNet alike) learns "object" but no shape class in 800 iterations.
THING_HUES = ((-25.0, 25.0), (95.0, 145.0), (215.0, 265.0))
# Vertices used to approximate a circle; enough for an IoU > 0.99 with the ideal disc.
CIRCLE_VERTICES = 32
_MAX_PLACEMENT_TRIES = 50


@dataclass
class SceneObject:
    """One object of a scene.

    Attributes:
        label: Index into ``THING_CLASSES``.
        polygon: Outline vertices in pixels, shape [N, 2] as (x, y).
        mask: Pixels covered by the object, bool [H, W].
    """

    label: int
    polygon: np.ndarray
    mask: np.ndarray


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: RGB image, uint8 [H, W, 3].
        objects: The objects, in drawing order (they do not overlap).
        stuff_map: Index into ``STUFF_CLASSES`` for every pixel, uint8 [H, W].
        clutter_mask: Unlabelled distractor pixels (no class), bool [H, W].
    """

    image: np.ndarray
    objects: list[SceneObject]
    stuff_map: np.ndarray
    clutter_mask: np.ndarray


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], float32 [H, W]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    coarse = Image.fromarray(grid, mode='F')
    return np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted texture, float32 [H, W, 3] in [0, 255]: base colour, blotches and faint stripes."""
    base = rng.uniform(60, 190, size=3)
    # Low saturation keeps the background distinct from the bright objects.
    base = 0.6 * base + 0.4 * base.mean()
    blotches = _smooth_noise(rng, height, width, cell=int(rng.integers(8, 24))) - 0.5
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 16)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / period)
    grain = rng.normal(0, 6, size=(height, width))
    shade = 50 * blotches + 12 * stripes + grain
    return np.clip(base[None, None, :] + shade[..., None], 0, 255).astype(np.float32)


def _shape_polygon(label: int, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Vertices [N, 2] of a circle, square or triangle of circumradius ``radius``."""
    vertex_count = (CIRCLE_VERTICES, 4, 3)[label]
    phases = angle + 2 * math.pi * np.arange(vertex_count) / vertex_count
    return centre[None, :] + radius * np.stack([np.cos(phases), np.sin(phases)], axis=1)


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterize a polygon [N, 2] (x, y) into a bool mask [H, W]."""
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _thing_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    """A saturated RGB colour of the class's hue range (:data:`THING_HUES`), float [3]."""
    hue = rng.uniform(*THING_HUES[label]) % 360
    rgb = colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    return 255 * np.array(rgb)


def _place_objects(
    rng: np.random.Generator, height: int, width: int, count: int, radius_range: tuple[float, float]
) -> list[tuple[np.ndarray, float]]:
    """Centres and radii of up to ``count`` non-overlapping discs fully inside the image."""
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        for _ in range(_MAX_PLACEMENT_TRIES):
            radius = rng.uniform(*radius_range)
            low, high = radius + 1, np.array([width, height]) - radius - 2
            centre = rng.uniform(low, high)
            if all(np.hypot(*(centre - c)) > radius + r + 3 for c, r in placed):
                placed.append((centre, radius))
                break
    return placed


def make_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    max_objects: int = 4,
    max_clutter: int = 2,
) -> Scene:
    """Render one random scene.

    Args:
        rng: Source of randomness; the scene is a pure function of its state.
        height: Image height in pixels (>= 32).
        width: Image width in pixels (>= 32).
        max_objects: Objects per scene are drawn from 1..max_objects.
        max_clutter: Clutter blobs per scene are drawn from 0..max_clutter.

    Returns:
        The scene.
    """
    if height < 32 or width < 32:
        raise ValueError(f'height and width must be >= 32, got {height=}, {width=}')
    if max_objects < 1:
        raise ValueError(f'max_objects must be >= 1, got {max_objects=}')
    horizon = int(rng.integers(height // 4, 3 * height // 4))
    stuff_map = np.zeros((height, width), dtype=np.uint8)
    stuff_map[horizon:] = 1
    image = np.where(
        stuff_map[..., None] == 0, _texture(rng, height, width), _texture(rng, height, width)
    )

    short_side = min(height, width)
    object_count = int(rng.integers(1, max_objects + 1))
    clutter_count = int(rng.integers(0, max_clutter + 1))
    discs = _place_objects(
        rng, height, width, object_count + clutter_count, (0.08 * short_side, 0.22 * short_side)
    )
    objects = []
    clutter_mask = np.zeros((height, width), dtype=bool)
    for index, (centre, radius) in enumerate(discs):
        if index < object_count:
            label = int(rng.integers(len(THING_CLASSES)))
            polygon = _shape_polygon(label, centre, radius, rng.uniform(0, 2 * math.pi))
            mask = polygon_mask(polygon, height, width)
            colour = _thing_colour(rng, label)
            shading = 20 * (_smooth_noise(rng, height, width, cell=16)[..., None] - 0.5)
            image = np.where(mask[..., None], colour + shading, image)
            objects.append(SceneObject(label=label, polygon=polygon, mask=mask))
        else:
            # Clutter: a dull, thin ellipse, so "anything bright" is not "an object".
            theta = np.linspace(0, 2 * math.pi, 16, endpoint=False)
            aspect = rng.uniform(0.25, 0.5)
            polygon = centre + radius * np.stack([np.cos(theta), aspect * np.sin(theta)], 1)
            blob = polygon_mask(polygon, height, width)
            image = np.where(blob[..., None], rng.uniform(40, 140, size=3), image)
            clutter_mask |= blob
    return Scene(
        image=np.clip(image, 0, 255).astype(np.uint8),
        objects=objects,
        stuff_map=stuff_map,
        clutter_mask=clutter_mask,
    )
