"""Whole-model checkpoints (detectors, segmentors): the layouts they come in and the host's.

The NAT repo trained its Mask R-CNN / Cascade Mask R-CNN with mmdet 2.19 and its UPerNet with
mmseg 0.20.2 (mmcv-full 1.4.8, torch 1.11), its Mask2Former with detectron2. What differs from
mmdet 3.x / mmseg 1.x (docs/checkpoints.md section 6 has the evidence):

- the **state dict** of every published mmdet 2.x / mmseg 0.x model has exactly the keys, shapes
  and order of the same model in mmdet 3.x / mmseg 1.x (``fc_cls`` keeps ``num_classes + 1``
  rows with background last, classes in the dataset's order, which is the same list), so it
  loads as it is;
- the **meta**: mmcv 1.x wrote the class names as ``CLASSES`` (and mmseg its ``PALETTE``);
  mmengine writes them as ``dataset_meta`` with ``classes`` / ``palette``, which the hosts'
  inferencers read first;
- **detectron2** Mask2Former files are renamed by :mod:`nat_mm.checkpoint.detectron2`.

Layout names: ``mmdet3`` / ``mmseg1`` (the host's own, also the ``--to`` names of
``tools/convert_checkpoint.py``), ``mmdet2`` / ``mmseg0`` (written by mmcv 1.x, told apart by
the ``meta`` only), ``detectron2-mask2former``.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from numbers import Integral

import torch
from torch import nn

from nat_mm.checkpoint.layouts import unwrap_state_dict
from nat_mm.errors import NatMMError

HOSTS = ('mmdet', 'mmseg')
HOST_LAYOUTS = {'mmdet': 'mmdet3', 'mmseg': 'mmseg1'}
MODEL_FORMATS = tuple(HOST_LAYOUTS.values())  # whole-model targets of convert_checkpoint.py
MMCV1_LAYOUTS = {'mmdet': 'mmdet2', 'mmseg': 'mmseg0'}
DETECTRON2_MASK2FORMER = 'detectron2-mask2former'
LAYOUT_DESCRIPTIONS = {
    'mmdet2': "mmdet 2.x (mmcv 1.x): the state dict has mmdet 3.x's keys and shapes",
    'mmseg0': "mmseg 0.x (mmcv 1.x): the state dict has mmseg 1.x's keys and shapes",
    DETECTRON2_MASK2FORMER: "detectron2 Mask2Former, renamed to the host's Mask2Former",
}
# Scalar meta entries of an mmcv 1.x file kept as provenance in a converted file (versions, time,
# epoch / iter, seed, exp_name, the config text, env_info); training state is not kept.
_PROVENANCE_TYPES = (str, int, float, bool, type(None))
# Top-level modules that only a detector / only a segmentor has.
_HOST_ONLY_PREFIXES = {
    'mmdet': ('rpn_head.', 'roi_head.', 'bbox_head.', 'panoptic_head.'),
    'mmseg': ('decode_head.', 'auxiliary_head.'),
}


def check_host(host: str) -> str:
    """Returns ``host``.

    Raises:
        NatMMError: ``host`` is not one of :data:`HOSTS`.
    """
    if host not in HOSTS:
        raise NatMMError(f'host must be one of {HOSTS}, got {host!r}', 'host')
    return host


def host_of_model(model: nn.Module) -> str | None:
    """'mmdet' or 'mmseg': the library of the model's class or of one of its bases (a DDP or
    test-time-augmentation wrapper is looked through); None for any other model."""
    model = getattr(model, 'module', model)
    for cls in type(model).__mro__:
        library = cls.__module__.split('.')[0]
        if library in HOSTS:
            return library
    return None


def convert_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], host: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Detects the layout of a whole-model state dict and returns it in the host's layout.

    mmdet 2.x / mmseg 0.x state dicts are the host's own layout (module docstring), so they come
    back as they are under the host's layout name; :func:`to_host_checkpoint` tells them apart
    by their ``meta``.

    Args:
        state_dict: A model's state dict (without ``module.`` prefixes).
        host: 'mmdet' or 'mmseg', the library of the model it is for.

    Returns:
        The state dict in the host's layout, and the detected layout: 'mmdet3' / 'mmseg1' or
        'detectron2-mask2former'.

    Raises:
        NatMMError: Unknown host; a detectron2 file with keys that have no counterpart.
    """
    check_host(host)
    from nat_mm.checkpoint import detectron2  # the converter of another layout, on demand

    if detectron2.is_detectron2_mask2former(state_dict):
        return detectron2.mask2former_to_openmmlab(state_dict, host), DETECTRON2_MASK2FORMER
    return dict(state_dict), HOST_LAYOUTS[host]


def written_by_mmcv1(meta: Mapping) -> bool:
    """Whether mmcv 1.x's ``save_checkpoint`` wrote the file (it records ``mmcv_version``;
    mmengine records ``mmengine_version`` instead).

    Raises:
        NatMMError: ``mmcv_version`` is not a string (a float 1.4 would read as '1.4').
    """
    version = meta.get('mmcv_version')
    if version is not None and not isinstance(version, str):
        raise NatMMError(
            f'meta.mmcv_version must be a version string, got {reprlib.repr(version)}', 'checkpoint'
        )
    return version is not None and version.startswith('1.')


def dataset_meta_from(meta: Mapping) -> dict | None:
    """mmengine-style ``dataset_meta`` of a checkpoint's meta.

    Its own ``dataset_meta`` (keys lower-cased, as mmdet's inferencer reads them), or mmcv 1.x's
    ``CLASSES`` / ``PALETTE`` as ``classes`` (a tuple) / ``palette`` (a list of [r, g, b]).
    Class names and colours are checked here, so that an odd value from a file fails with its
    name, not later in an inferencer or a visualizer.

    Returns:
        The dataset meta, or None when the meta names no classes.

    Raises:
        NatMMError: ``CLASSES`` / ``dataset_meta.classes`` is not a non-empty list of names,
            ``PALETTE`` not one [r, g, b] of ints 0..255 per class (``dataset_meta.palette``: at
            least one per class, as mmdet's visualizer needs), ``dataset_meta`` not a dict or
            with a key spelled twice ('classes' and 'CLASSES').
    """
    own = meta.get('dataset_meta')
    if own is not None:
        if not isinstance(own, Mapping):
            raise NatMMError(
                f'meta.dataset_meta must be a dict, got {reprlib.repr(own)}', 'checkpoint'
            )
        lowered = {str(key).lower(): value for key, value in own.items()}
        if len(lowered) < len(own):  # 'CLASSES' and 'classes': one would win silently
            raise NatMMError(
                f'meta.dataset_meta spells a key twice: {sorted(map(str, own))}', 'checkpoint'
            )
        classes, palette = lowered.get('classes'), lowered.get('palette')
        if classes is not None:
            _check_class_names(classes, 'meta.dataset_meta.classes')
        if palette is not None:
            _check_palette(palette, 'meta.dataset_meta.palette', len(classes or ()), exact=False)
        return lowered
    classes = meta.get('CLASSES')
    if classes is None:
        return None
    _check_class_names(classes, 'meta.CLASSES')
    dataset_meta = {'classes': tuple(classes)}
    palette = meta.get('PALETTE')
    if palette is not None:
        _check_palette(palette, 'meta.PALETTE', len(classes), exact=True)
        dataset_meta['palette'] = [list(color) for color in palette]
    return dataset_meta


def _check_class_names(classes: object, field: str) -> None:
    """A set or a dict would iterate (unordered / keys only), an int or a 0-d tensor would not."""
    if not (
        isinstance(classes, (list, tuple))
        and classes
        and all(isinstance(name, str) for name in classes)
    ):
        raise NatMMError(
            f'{field} must be a list of class names (at least one), got {reprlib.repr(classes)}',
            'checkpoint',
        )


def _check_palette(palette: object, field: str, num_classes: int, exact: bool) -> None:
    def is_color(color: object) -> bool:
        return (
            isinstance(color, (list, tuple))
            and len(color) == 3
            and all(
                isinstance(c, Integral) and not isinstance(c, bool) and 0 <= c <= 255 for c in color
            )
        )

    if not (
        isinstance(palette, (list, tuple))
        and (len(palette) == num_classes if exact else len(palette) >= num_classes)
        and all(is_color(color) for color in palette)
    ):
        count = num_classes if exact else f'at least {num_classes}'
        raise NatMMError(
            f'{field} must hold one [r, g, b] of ints per class ({count}), each 0 to 255, got '
            f'{reprlib.repr(palette)}',
            'checkpoint',
        )


def to_host_checkpoint(
    checkpoint: object, host: str, source: object = None
) -> tuple[dict[str, object], str]:
    """A whole-model checkpoint of any detected layout as the host writes one.

    Args:
        checkpoint: What :func:`nat_mm.checkpoint.load_checkpoint` returned.
        host: 'mmdet' or 'mmseg'.
        source: The file it came from, for error messages.

    Returns:
        ``{'state_dict': ..., 'meta': ...}`` and the detected layout (module docstring). A file
        in the host's own layout keeps its meta; another layout's meta becomes
        ``{'converted_from': {'layout': ..., <its scalar entries>}}``. Either gets
        ``dataset_meta`` (:func:`dataset_meta_from`) where the file names its classes. Training
        state (optimizer, message hub, schedulers, mmcv 1.x ``hook_msgs`` / ``fp16``) is not
        kept.

    Raises:
        NatMMError: No state dict, unknown host, a ``meta`` that is not a dict, or a bad
            ``mmcv_version`` / ``CLASSES`` / ``PALETTE`` / ``dataset_meta``.
    """
    state_dict, layout = convert_model_state_dict(unwrap_state_dict(checkpoint, source), host)
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    if meta is None:
        meta = {}
    elif not isinstance(meta, Mapping):  # what mmcv / mmengine write is a dict
        raise NatMMError(f'meta must be a dict, got a {type(meta).__name__}', source)
    if layout == HOST_LAYOUTS[host] and written_by_mmcv1(meta):
        layout = MMCV1_LAYOUTS[host]
    if layout == HOST_LAYOUTS[host]:
        host_meta = dict(meta)
    else:
        provenance = {k: v for k, v in meta.items() if isinstance(v, _PROVENANCE_TYPES)}
        host_meta = {'converted_from': {'layout': layout, **provenance}}
    dataset_meta = dataset_meta_from(meta)
    if dataset_meta is not None:
        host_meta['dataset_meta'] = dataset_meta
    return {'state_dict': state_dict, 'meta': host_meta}, layout


def check_whole_model(state_dict: Mapping[str, torch.Tensor], host: str, source: object) -> None:
    """Checks that ``state_dict`` is a whole model of the host's kind: a backbone and more, and
    no module only the other library's models have.

    Raises:
        NatMMError: A backbone-only file, a segmentor's file for a detector (or vice versa), or
            a segmentor without a ``decode_head`` (every mmseg 1.x segmentor has one).
    """
    prefixes = sorted({key.split('.', 1)[0] + '.' for key in state_dict})
    if 'backbone.' not in prefixes or prefixes == ['backbone.']:
        raise NatMMError(
            f'not a whole {host} model: a backbone and its neck / heads are expected, the state '
            f'dict has the top-level modules {prefixes[:8]} (a backbone checkpoint converts '
            'with --to original / mmdet)',
            source,
        )
    other = HOSTS[1 - HOSTS.index(host)]
    foreign = [prefix for prefix in prefixes if prefix in _HOST_ONLY_PREFIXES[other]]
    if foreign:
        raise NatMMError(
            f'an {other} model, not an {host} one: it has {", ".join(foreign)} (use --to '
            f'{HOST_LAYOUTS[other]})',
            source,
        )
    if host == 'mmseg' and 'decode_head.' not in prefixes:  # e.g. a SOLO-like detector
        raise NatMMError(
            f'not a whole mmseg model: it has no decode_head. (every mmseg segmentor has one); '
            f'its top-level modules are {prefixes[:8]}',
            source,
        )
