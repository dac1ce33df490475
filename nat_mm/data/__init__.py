"""Seeded synthetic datasets in the real COCO / COCO panoptic / ADE20K formats (the demo data)."""

from .demo_datasets import (
    ADE_SUBDIR,
    SPLITS,
    DemoDataSettings,
    generate_demo_datasets,
    read_settings,
)
from .formats import (
    STUFF_CATEGORY_IDS,
    THING_CATEGORY_IDS,
    ade_classes,
    ade_label_map,
    coco_instance_annotations,
    id_to_rgb,
    mask_to_uncompressed_rle,
    panoptic_segments,
    rgb_to_id,
)
from .scenes import STUFF_CLASSES, THING_CLASSES, Scene, SceneObject, make_scene

__all__ = [
    'ADE_SUBDIR',
    'SPLITS',
    'STUFF_CATEGORY_IDS',
    'STUFF_CLASSES',
    'THING_CATEGORY_IDS',
    'THING_CLASSES',
    'DemoDataSettings',
    'Scene',
    'SceneObject',
    'ade_classes',
    'ade_label_map',
    'coco_instance_annotations',
    'generate_demo_datasets',
    'id_to_rgb',
    'make_scene',
    'mask_to_uncompressed_rle',
    'panoptic_segments',
    'read_settings',
    'rgb_to_id',
]
