"""Dataset checks before training or evaluation, and the demo data with a progress bar.

A missing folder, an annotation file that lists no images, or an image whose size disagrees with
its annotation otherwise surface as a traceback deep inside a data pipeline, after the model is
built and maybe after hours of training. :func:`check_dataset_files` finds them first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

from mmengine.config import Config
from PIL import Image

from nat_mm.data import DemoDataSettings
from nat_mm.errors import NatMMError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def _dataset_cfgs(dataset_cfg: dict) -> Iterator[dict]:
    """Every concrete dataset config, looking through wrappers (RepeatDataset, Concat...)."""
    if 'dataset' in dataset_cfg:
        yield from _dataset_cfgs(dataset_cfg['dataset'])
    elif 'datasets' in dataset_cfg:
        for child in dataset_cfg['datasets']:
            yield from _dataset_cfgs(child)
    else:
        yield dataset_cfg


def _under(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with Image.open(path) as image:
        return image.size


def _check_coco_annotations(ann_file: str, image_dir: str, needs_annotations: bool) -> None:
    """A COCO-style json: images listed, files present, sizes as stated."""
    try:
        with open(ann_file) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise NatMMError(f'cannot read the annotation file: {error}', ann_file) from error
    if not isinstance(content, dict) or 'images' not in content:
        return  # not COCO-style: the dataset class reads it its own way
    images = content['images']
    if not images:
        raise NatMMError('the annotation file lists no images', ann_file)
    if needs_annotations and 'annotations' in content and not content['annotations']:
        raise NatMMError('the annotation file has no annotations to train on', ann_file)
    for entry in images:
        path = os.path.join(image_dir, entry['file_name'])
        if not os.path.isfile(path):
            raise NatMMError(
                f'image {entry["file_name"]!r} listed in {ann_file} does not exist', path
            )
        stated = (entry.get('width'), entry.get('height'))
        if None in stated:
            continue
        actual = _image_size(path)
        if actual != stated and actual != stated[::-1]:  # EXIF rotation may swap the two
            raise NatMMError(
                f'the image is {actual[0]}x{actual[1]} but {ann_file} says '
                f'{stated[0]}x{stated[1]} (width x height)',
                path,
            )


def _check_image_folder(folder: str, what: str) -> None:
    if not os.path.isdir(folder):
        raise NatMMError(f'the {what} folder does not exist', folder)
    if not any(name.lower().endswith(IMAGE_EXTENSIONS) for name in os.listdir(folder)):
        raise NatMMError(
            f'the {what} folder holds no image ({", ".join(IMAGE_EXTENSIONS)})', folder
        )


def check_dataset_files(cfg: Config, dataloader_keys: tuple[str, ...]) -> None:
    """Fails early, naming the file, on dataset files that cannot work.

    For each dataset of the given dataloaders: ``data_root`` exists; a COCO-style annotation
    file lists images, every image exists with the stated size (and training sets have
    annotations); image / label folders of folder-based datasets (ADE20K) hold images.

    Raises:
        NatMMError: The first problem found.
    """
    for key in dataloader_keys:
        loader = cfg.get(key)
        if not loader:
            continue
        for dataset in _dataset_cfgs(loader['dataset']):
            root = dataset.get('data_root') or ''
            if root and not os.path.isdir(root):
                raise NatMMError(
                    f'{key}: the dataset folder data_root does not exist; docs/usage.md says '
                    'where datasets go, tools/make_data.py makes the demo data',
                    root,
                )
            prefix = dataset.get('data_prefix') or {}
            ann_file = dataset.get('ann_file')
            if ann_file:
                ann_path = _under(root, ann_file)
                if not os.path.isfile(ann_path):
                    raise NatMMError(f'{key}: the annotation file does not exist', ann_path)
                if ann_path.endswith('.json'):
                    image_dir = _under(root, prefix.get('img', ''))
                    _check_coco_annotations(ann_path, image_dir, key == 'train_dataloader')
            else:
                for prefix_key, what in (('img_path', 'image'), ('seg_map_path', 'label')):
                    if prefix.get(prefix_key):
                        _check_image_folder(_under(root, prefix[prefix_key]), f'{key} {what}')


def generate_demo_data(
    root: str, settings: DemoDataSettings, force: bool = False, quiet: bool = False
) -> dict:
    """Generates (or reuses) the demo data under ``root`` with a progress bar.

    Returns:
        The generator's summary (``{'reused': True}`` when the same data is already there).

    Raises:
        NatMMError: ``root`` is a file, or holds data the generator did not write.
    """
    from mmengine.utils import ProgressBar

    from nat_mm.data import generate_demo_datasets, read_settings

    if os.path.exists(root) and not os.path.isdir(root):
        raise NatMMError('the data folder is a file', root)
    if not force and read_settings(root) == settings:
        if not quiet:
            print(f'reusing the demo data in {root} (same settings; --force to rewrite)')
        return {'reused': True}
    start = time.perf_counter()
    if not quiet:
        print(f'generating the demo data in {root}: {settings}')
    bar = None if quiet else ProgressBar(settings.num_train + settings.num_val)
    try:
        summary = generate_demo_datasets(
            root, settings, progress=None if bar is None else bar.update, force=True
        )
    except ValueError as error:
        raise NatMMError(str(error), root) from error
    if not quiet:
        train, val = summary['train'], summary['val']
        print(
            f'\nwrote {train["images"]} train images ({train["objects"]} objects) and '
            f'{val["images"]} val images ({val["objects"]} objects) in '
            f'{time.perf_counter() - start:.1f}s'
        )
    return summary
