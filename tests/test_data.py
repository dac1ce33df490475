"""The demo-data generator on its own: geometry, encodings, determinism, folder layout."""

import json
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from nat_mm.data import (
    ADE_SUBDIR,
    STUFF_CATEGORY_IDS,
    STUFF_CLASSES,
    THING_CATEGORY_IDS,
    THING_CLASSES,
    DemoDataSettings,
    ade_label_map,
    coco_instance_annotations,
    generate_demo_datasets,
    id_to_rgb,
    make_scene,
    mask_to_uncompressed_rle,
    panoptic_segments,
    read_settings,
    rgb_to_id,
)

SMALL = DemoDataSettings(num_train=6, num_val=3, height=64, width=80, seed=3)


def decode_uncompressed_rle(rle: dict) -> np.ndarray:
    """Independent decoder of COCO uncompressed RLE (column-major, zeros first)."""
    height, width = rle['size']
    values = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in rle['counts']:
        values[position : position + run] = value
        position += run
        value = not value
    assert position == height * width
    return values.reshape((width, height)).T


def decode_panoptic_rgb(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic decoding, written out independently of ``id_to_rgb`` / ``rgb_to_id``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo'))
    ticks = []
    generate_demo_datasets(root, SMALL, progress=lambda: ticks.append(1))
    assert len(ticks) == SMALL.num_train + SMALL.num_val
    return root


def test_scene_objects_are_disjoint_and_inside_image():
    for seed in range(10):
        scene = make_scene(np.random.default_rng(seed), 48, 64, max_objects=4)
        assert scene.image.shape == (48, 64, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 4
        coverage = np.zeros((48, 64), dtype=int)
        for obj in scene.objects:
            assert obj.mask.any()
            assert 0 <= obj.label < len(THING_CLASSES)
            assert (obj.polygon >= 0).all() and (obj.polygon[:, 0] < 64).all()
            assert (obj.polygon[:, 1] < 48).all()
            coverage += obj.mask
        assert coverage.max() == 1
        assert not (scene.clutter_mask & (coverage > 0)).any()


def test_scene_is_a_pure_function_of_the_seed():
    first = make_scene(np.random.default_rng(7), 40, 40)
    second = make_scene(np.random.default_rng(7), 40, 40)
    other = make_scene(np.random.default_rng(8), 40, 40)
    assert np.array_equal(first.image, second.image)
    assert not np.array_equal(first.image, other.image)


def test_each_thing_class_has_its_own_hue_range():
    import colorsys

    from nat_mm.data.scenes import THING_HUES

    hues = {label: [] for label in range(len(THING_CLASSES))}
    for seed in range(20):
        scene = make_scene(np.random.default_rng(seed), 64, 64)
        for obj in scene.objects:
            red, green, blue = scene.image[obj.mask].mean(axis=0) / 255
            hue, saturation, _ = colorsys.rgb_to_hsv(red, green, blue)
            assert saturation > 0.6
            hues[obj.label].append(hue * 360)
    for label, (low, high) in enumerate(THING_HUES):
        assert hues[label], f'no {THING_CLASSES[label]} drawn'
        # Signed distance to the range's centre, on the circle (reds wrap around 0).
        offsets = (np.array(hues[label]) - (low + high) / 2 + 180) % 360 - 180
        assert np.abs(offsets).max() <= (high - low) / 2 + 5  # the shading moves it a little


def test_data_of_an_earlier_scene_version_is_drawn_again(tmp_path):
    from nat_mm.data.demo_datasets import SCENE_VERSION, SETTINGS_FILE

    root = str(tmp_path / 'data')
    settings = DemoDataSettings(num_train=2, num_val=1, height=32, width=32)
    generate_demo_datasets(root, settings)
    stored = json.loads((tmp_path / 'data' / SETTINGS_FILE).read_text())
    assert stored['scene_version'] == SCENE_VERSION
    del stored['scene_version']  # as written before the version was recorded
    (tmp_path / 'data' / SETTINGS_FILE).write_text(json.dumps(stored))
    assert read_settings(root).scene_version == 1
    assert generate_demo_datasets(root, settings)['reused'] is False
    assert read_settings(root) == settings
    with pytest.raises(ValueError, match='scene_version'):
        generate_demo_datasets(root, DemoDataSettings(num_train=2, num_val=1, scene_version=1))


def test_scene_rejects_tiny_images():
    with pytest.raises(ValueError, match='height and width'):
        make_scene(np.random.default_rng(0), 16, 64)


@pytest.mark.parametrize('first_pixel', [False, True])
def test_uncompressed_rle_round_trip(first_pixel):
    mask = np.random.default_rng(1).random((7, 5)) > 0.5
    mask[0, 0] = first_pixel
    rle = mask_to_uncompressed_rle(mask)
    assert rle['size'] == [7, 5]
    assert sum(rle['counts']) == 35
    assert np.array_equal(decode_uncompressed_rle(rle), mask)


def test_coco_annotations_match_masks():
    scene = make_scene(np.random.default_rng(2), 64, 64, max_objects=4)
    annotations = coco_instance_annotations(scene, 5, 10, 'mixed')
    assert [a['id'] for a in annotations] == list(range(10, 10 + len(scene.objects)))
    for annotation, obj in zip(annotations, scene.objects, strict=True):
        assert annotation['image_id'] == 5
        assert annotation['category_id'] == THING_CATEGORY_IDS[obj.label]
        ys, xs = np.nonzero(obj.mask)
        x, y, w, h = annotation['bbox']
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert annotation['area'] == obj.mask.sum()
        segmentation = annotation['segmentation']
        if annotation['id'] % 2:
            assert np.array_equal(decode_uncompressed_rle(segmentation), obj.mask)
        else:
            assert len(segmentation[0]) == 2 * len(obj.polygon)


def test_coco_annotations_reject_unknown_mask_format():
    scene = make_scene(np.random.default_rng(0), 32, 32)
    with pytest.raises(ValueError, match='mask_format'):
        coco_instance_annotations(scene, 1, 1, 'bitmap')


def test_panoptic_segments_cover_everything_but_clutter():
    scene = make_scene(np.random.default_rng(4), 64, 64, max_objects=3, max_clutter=2)
    ids, segments = panoptic_segments(scene, first_segment_id=1)
    assert np.array_equal(ids == 0, scene.clutter_mask)
    for segment in segments:
        region = ids == segment['id']
        assert region.sum() == segment['area']
        assert segment['category_id'] in THING_CATEGORY_IDS + STUFF_CATEGORY_IDS
    thing_segments = [s for s in segments if s['category_id'] in THING_CATEGORY_IDS]
    assert len(thing_segments) == len(scene.objects)
    assert np.array_equal(decode_panoptic_rgb(id_to_rgb(ids)), ids)


def test_rgb_to_id_decodes_what_id_to_rgb_encodes():
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    ids = rgb_to_id(rgb)
    assert ids.dtype == np.int64 and np.array_equal(ids, decode_panoptic_rgb(rgb))
    assert np.array_equal(id_to_rgb(ids), rgb)


def test_id_to_rgb_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match='segment ids'):
        id_to_rgb(np.array([[256**3]]))


def test_ade_label_map_uses_zero_for_clutter_only():
    scene = make_scene(np.random.default_rng(5), 64, 64, max_clutter=2)
    labels = ade_label_map(scene)
    assert np.array_equal(labels == 0, scene.clutter_mask)
    assert labels.max() <= len(STUFF_CLASSES) + len(THING_CLASSES)
    for obj in scene.objects:
        assert (labels[obj.mask] == len(STUFF_CLASSES) + obj.label + 1).all()


def test_settings_validate_arguments():
    with pytest.raises(ValueError, match='num_train'):
        DemoDataSettings(num_train=0)
    with pytest.raises(ValueError, match='mask_format'):
        DemoDataSettings(mask_format='png')


def test_generated_folder_layout(demo_root):
    coco = osp.join(demo_root, 'coco')
    for split, count in (('train2017', SMALL.num_train), ('val2017', SMALL.num_val)):
        with open(osp.join(coco, 'annotations', f'instances_{split}.json')) as f:
            instances = json.load(f)
        assert len(instances['images']) == count
        assert [c['name'] for c in instances['categories']] == list(THING_CLASSES)
        for image in instances['images']:
            with Image.open(osp.join(coco, split, image['file_name'])) as img:
                assert img.size == (SMALL.width, SMALL.height)
        with open(osp.join(coco, 'annotations', f'panoptic_{split}.json')) as f:
            panoptic = json.load(f)
        for entry in panoptic['annotations']:
            png = osp.join(coco, 'annotations', f'panoptic_{split}', entry['file_name'])
            ids = decode_panoptic_rgb(np.asarray(Image.open(png)))
            present = set(np.unique(ids).tolist()) - {0}
            assert present == {s['id'] for s in entry['segments_info']}
    for split, count in (('training', SMALL.num_train), ('validation', SMALL.num_val)):
        labels = osp.join(demo_root, ADE_SUBDIR, 'annotations', split)
        assert len(os.listdir(labels)) == count


def test_generation_is_reproducible_and_reused(demo_root, tmp_path):
    assert read_settings(demo_root) == SMALL
    assert generate_demo_datasets(demo_root, SMALL) == {'reused': True}
    other = str(tmp_path / 'again')
    generate_demo_datasets(other, SMALL)
    for relative in ('coco/annotations/instances_train2017.json', 'coco/val2017/000000000002.jpg'):
        with open(osp.join(demo_root, relative), 'rb') as first:
            expected = first.read()
        with open(osp.join(other, relative), 'rb') as second:
            assert second.read() == expected


def test_regeneration_removes_stale_images(tmp_path):
    root = str(tmp_path / 'data')
    generate_demo_datasets(root, DemoDataSettings(num_train=4, num_val=2, height=32, width=32))
    generate_demo_datasets(root, DemoDataSettings(num_train=2, num_val=1, height=32, width=32))
    assert len(os.listdir(osp.join(root, 'coco', 'train2017'))) == 2
    assert len(os.listdir(osp.join(root, ADE_SUBDIR, 'images', 'training'))) == 2


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / 'coco').mkdir()
    with pytest.raises(ValueError, match='refusing to overwrite'):
        generate_demo_datasets(str(tmp_path), SMALL)
    assert (tmp_path / 'coco').is_dir()
