"""Loading weights strictly: every missing, unexpected, mis-shaped or non-finite key is reported.

One comparison (:func:`compare_state_dicts`) serves both callers: whole detectors / segmentors
(:func:`load_model_checkpoint` and :func:`load_model_state`, used by the runner, test, demo),
which first bring a file of another layout (mmdet 2.x / mmseg 0.x, detectron2 Mask2Former) to
the host's (:mod:`nat_mm.checkpoint.model_layouts`), and NAT / DiNAT backbones
(:func:`load_backbone_checkpoint`, used by ``init_cfg=dict(type='Pretrained', ...)``), which add
the format conversion and their rules for keys a backbone may ignore.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from mmengine.logging import print_log
from torch import nn

from nat_mm.checkpoint.layouts import resize_rpb, rpb_kernel_size, to_natmm, unwrap_state_dict
from nat_mm.checkpoint.model_layouts import (
    HOST_LAYOUTS,
    LAYOUT_DESCRIPTIONS,
    host_of_model,
    to_host_checkpoint,
)
from nat_mm.checkpoint.reading import load_checkpoint
from nat_mm.errors import NatMMError


@dataclass(frozen=True)
class KeyReport:
    """How a state dict differs from what a model expects (every key, never a sample)."""

    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[str]
    non_finite: list[str]
    mis_typed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.missing or self.unexpected or self.mis_shaped or self.non_finite or self.mis_typed
        )

    def describe(self) -> str:
        parts = [
            f'{len(keys)} {title}: {", ".join(keys)}'
            for title, keys in (
                ('missing keys', self.missing),
                ('unexpected keys', self.unexpected),
                ('keys with other shapes', self.mis_shaped),
                ('keys with another dtype', self.mis_typed),
                ('keys with NaN or inf values', self.non_finite),
            )
            if keys
        ]
        return '; '.join(parts)


def compare_state_dicts(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    may_be_missing: Callable[[str], bool] = lambda key: False,
) -> KeyReport:
    """Compares a checkpoint's state dict with a model's.

    Args:
        expected: The model's state dict.
        found: The checkpoint's state dict (keys the caller ignores already removed).
        may_be_missing: Model keys that may be absent from the checkpoint (they keep their init).

    Returns:
        The differences, each list sorted. A float tensor may have another float dtype (fp16,
        bf16, fp64 load cast to the model's, as ``load_state_dict`` casts), and is checked for
        NaN / inf in the model's dtype (1e39 in fp64 is inf in fp32); any other change of kind
        (complex, bool, int, quantized into float or the reverse) and a meta tensor
        (no data) are reported with the dtypes.
    """
    missing = sorted(key for key in expected if key not in found and not may_be_missing(key))
    unexpected = sorted(key for key in found if key not in expected)
    mis_shaped = sorted(
        f'{key} (checkpoint {list(found[key].shape)}, model {list(expected[key].shape)})'
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    )
    mis_typed = sorted(
        f'{key} (checkpoint {_dtype_name(found[key])}, model {expected[key].dtype})'
        for key in expected
        if key in found and (found[key].is_meta or _kind(found[key]) != _kind(expected[key]))
    )
    non_finite = []
    for key, value in found.items():
        if not value.is_floating_point() or value.is_meta:
            continue
        target = expected.get(key)
        dtype = target.dtype if target is not None and target.is_floating_point() else None
        # float8 has no isfinite of its own: checked in float32
        dtype = dtype or torch.promote_types(value.dtype, torch.float32)
        if not bool(torch.isfinite(value.to(dtype)).all()):
            non_finite.append(key)
    return KeyReport(missing, unexpected, mis_shaped, sorted(non_finite), mis_typed)


def _kind(tensor: torch.Tensor) -> tuple[bool, ...]:
    """What a cast between two dtypes of one kind keeps: float, complex, bool, quantized, int."""
    return (
        tensor.is_floating_point(),
        tensor.is_complex(),
        tensor.dtype == torch.bool,
        tensor.is_quantized,
    )


def _dtype_name(tensor: torch.Tensor) -> str:
    return 'a meta tensor' if tensor.is_meta else str(tensor.dtype)


def load_model_checkpoint(
    model: nn.Module,
    source: str | os.PathLike,
    trust: bool = False,
    map_location: Any = 'cpu',
    sha256: str | None = None,
) -> Any:
    """Reads a checkpoint safely and loads it into ``model`` (a whole detector / segmentor).

    Args:
        model: The model; a DDP wrapper is looked through.
        source: See :func:`nat_mm.checkpoint.load_checkpoint`.
        trust: Allow full unpickling (only for files you trust).
        map_location: As for :func:`torch.load`.
        sha256: Expected SHA-256 of the file, or None.

    Returns:
        The checkpoint object as read (its ``meta`` holds e.g. the dataset's class names).

    Raises:
        NatMMError: Unreadable file, or keys / shapes / values that do not fit, all listed.
    """
    checkpoint = load_checkpoint(source, map_location=map_location, trust=trust, sha256=sha256)
    load_model_state(model, checkpoint, source)
    return checkpoint


def load_model_state(model: nn.Module, checkpoint: object, source: object) -> dict[str, object]:
    """Loads a checkpoint object already read into ``model`` (a whole detector / segmentor).

    For an mmdet / mmseg model, a file of another layout (mmdet 2.x / mmseg 0.x, detectron2
    Mask2Former) is first brought to the model's library's, and the detected layout is logged
    (:func:`~nat_mm.checkpoint.model_layouts.to_host_checkpoint`); any other model gets the
    state dict as it is.

    Args:
        model: The model; a DDP or test-time-augmentation wrapper is looked through.
        checkpoint: What :func:`nat_mm.checkpoint.load_checkpoint` returned.
        source: The file it came from, for messages.

    Returns:
        The checkpoint in the host's layout, ``{'state_dict': ..., 'meta': ...}`` (the meta with
        ``dataset_meta`` where the file names its classes).

    Raises:
        NatMMError: Keys / shapes / values that do not fit, all listed.
    """
    host = host_of_model(model)
    if host is None:
        host_checkpoint = {'state_dict': unwrap_state_dict(checkpoint, source), 'meta': {}}
    else:
        host_checkpoint, layout = to_host_checkpoint(checkpoint, host, source)
        if layout != HOST_LAYOUTS[host]:
            print_log(
                f'checkpoint {source}: {layout} layout ({LAYOUT_DESCRIPTIONS[layout]}), loaded '
                f'into the {host} model',
                logger='current',
            )
    load_state_dict_strictly(model, host_checkpoint['state_dict'], source)
    return host_checkpoint


def load_state_dict_strictly(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: object
) -> None:
    """``model.load_state_dict(state_dict)`` after :func:`compare_state_dicts` found no problem.

    Raises:
        NatMMError: Listing every missing, unexpected, mis-shaped and non-finite key.
    """
    model = getattr(model, 'module', model)  # DDP / MMDistributedDataParallel
    report = compare_state_dicts(model.state_dict(), state_dict)
    if report:
        raise NatMMError(
            f'checkpoint does not fit the {type(model).__name__} model: {report.describe()}',
            source,
        )
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- backbones

_OUTPUT_NORM = re.compile(r'norm\d+\.')


def _is_classifier_key(key: str) -> bool:
    """Keys of ImageNet checkpoints that a backbone does not have: ``head.*`` and ``norm.*``."""
    return key.startswith(('head.', 'norm.'))


def _resize_rpb_tables(
    state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """Resizes, in place, RPB tables of another odd kernel size to the model's (as upstream's
    ``dinat_large_in22k_224_11x11interp.pth``); any other shape is left for the report."""
    for key, value in list(state_dict.items()):
        target = expected.get(key)
        if (
            key.endswith('attn.rpb')
            and target is not None
            and value.shape != target.shape
            and value.shape[0] == target.shape[0]
            and rpb_kernel_size(tuple(value.shape)) is not None
        ):
            print_log(
                f'{key}: resizing RPB {list(value.shape)} -> {list(target.shape)} (bicubic)',
                logger='current',
                level=logging.WARNING,  # the model now differs from the file
            )
            state_dict[key] = resize_rpb(value, (target.shape[-1] + 1) // 2)


def load_backbone_checkpoint(
    model: nn.Module, source: str | os.PathLike, trust: bool = False, sha256: str | None = None
) -> str:
    """Loads a checkpoint of any recognised layout into a NAT / DiNAT backbone, strictly.

    Classifier keys (``head.*``, ``norm.*``) and, in downstream checkpoints, the other parts of the
    model (neck, heads) are ignored and logged. So are, each by name, the keys under the model's
    ``pruned_prefixes`` (the stages after the last of ``out_indices``, which it does not build).
    Output norms (``norm{i}``) of stages the file has none of (ImageNet checkpoints) keep their
    initialisation, as upstream.

    Args:
        model: The backbone.
        source: See :func:`nat_mm.checkpoint.load_checkpoint`.
        trust: Allow full unpickling (only for files you trust).
        sha256: Expected SHA-256 of the file, or None.

    Returns:
        The detected layout.

    Raises:
        NatMMError: Missing, unexpected, mis-shaped or non-finite backbone keys, all listed.
    """
    raw = unwrap_state_dict(load_checkpoint(source, trust=trust, sha256=sha256), source)
    state_dict, source_format, dropped = to_natmm(raw)
    expected = model.state_dict()
    ignored = dropped + sorted(key for key in state_dict if _is_classifier_key(key))
    state_dict = {k: v for k, v in state_dict.items() if not _is_classifier_key(k)}
    pruned_prefixes = tuple(getattr(model, 'pruned_prefixes', ()))
    pruned = sorted(key for key in state_dict if key.startswith(pruned_prefixes))
    if pruned:
        print_log(
            f'{type(model).__name__} does not build {", ".join(p + "*" for p in pruned_prefixes)}'
            f' (out_indices): ignored their {len(pruned)} keys {pruned}',
            logger='current',
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(pruned_prefixes)}
    _resize_rpb_tables(state_dict, expected)
    file_has_output_norms = any(_OUTPUT_NORM.match(key) for key in state_dict)
    # Output norms of stages the backbone does not return are ignored too.
    ignored += sorted(k for k in state_dict if _OUTPUT_NORM.match(k) and k not in expected)
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not _OUTPUT_NORM.match(k)}

    def may_be_missing(key: str) -> bool:
        return not file_has_output_norms and bool(_OUTPUT_NORM.match(key))

    report = compare_state_dicts(expected, state_dict, may_be_missing)
    if report:
        raise NatMMError(
            f'checkpoint ({source_format} layout) does not fit {type(model).__name__}: '
            f'{report.describe()}',
            source,
        )
    model.load_state_dict(state_dict, strict=False)  # only the optional output norms are absent
    kept_init = [key for key in expected if key not in state_dict]
    print_log(
        f'Loaded {source_format} checkpoint {os.fspath(source)!r} into {type(model).__name__}; '
        f'ignored {len(ignored)} keys the backbone does not use {ignored[:6]}'
        f'{"..." if len(ignored) > 6 else ""}; kept the initialisation of {kept_init}',
        logger='current',
    )
    return source_format
