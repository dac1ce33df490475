"""Writing converted checkpoint files (atomically, :mod:`nat_mm.fileio`)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import safetensors.torch
import torch

from nat_mm.checkpoint.layouts import (
    FORMATS,
    NATMM_MARKERS,
    from_natmm,
    to_natmm,
    unwrap_state_dict,
)
from nat_mm.checkpoint.model_layouts import (
    HOST_LAYOUTS,
    MODEL_FORMATS,
    check_whole_model,
    to_host_checkpoint,
)
from nat_mm.checkpoint.reading import HF_WEIGHT_FILES, load_checkpoint
from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes, check_can_write


def checkpoint_file_path(destination: str | os.PathLike) -> str:
    """The file a converted checkpoint goes to: ``destination``, or ``model.safetensors`` in it
    when it is a folder (existing, or written with a trailing slash), as HuggingFace has it."""
    path = os.fspath(destination)
    if os.path.isdir(path) or path.endswith(('/', os.sep)):
        return os.path.join(path, HF_WEIGHT_FILES[0])
    return path


def save_checkpoint_file(checkpoint: Mapping[str, object], path: str | os.PathLike) -> str:
    """Writes a converted checkpoint atomically: safetensors for ``*.safetensors`` paths,
    ``torch.save`` otherwise.

    Returns:
        The path written.

    Raises:
        NatMMError: A safetensors file was asked for a nested (mmdet) layout.
    """
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            raise NatMMError(
                'safetensors holds a flat state dict only; write the mmdet layout to a .pth file',
                path,
            )
        data = safetensors.torch.save(
            {key: value.contiguous() for key, value in checkpoint.items()}
        )
    else:
        buffer = io.BytesIO()
        torch.save(dict(checkpoint), buffer)
        data = buffer.getvalue()
    return atomic_write_bytes(data, path)


def convert_checkpoint_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    target_format: str,
    hf_prefix: str = 'nat',
    force: bool = False,
    trust: bool = False,
    sha256: str | None = None,
) -> tuple[str, str, list[str]]:
    """Reads ``source`` (any recognised layout) and writes it in ``target_format``.

    A backbone format (:data:`~nat_mm.checkpoint.layouts.FORMATS`) keeps the NAT / DiNAT
    backbone only. 'mmdet3' / 'mmseg1' (:data:`~nat_mm.checkpoint.model_layouts.MODEL_FORMATS`)
    write the whole model as mmdet 3.x / mmseg 1.x save it, ``{'state_dict', 'meta'}`` with the
    class names as ``meta['dataset_meta']`` (from an mmdet 2.x / mmseg 0.x, detectron2 or own
    file; :func:`~nat_mm.checkpoint.model_layouts.to_host_checkpoint`), without training state.

    Args:
        source: File, HuggingFace folder or URL.
        destination: Output file (``.pth``, ``.bin``, ``.safetensors``) or folder (gets
            ``model.safetensors``); a whole model goes to a ``.pth`` / ``.bin`` file.
        target_format: One of :data:`~nat_mm.checkpoint.layouts.FORMATS` or
            :data:`~nat_mm.checkpoint.model_layouts.MODEL_FORMATS`.
        hf_prefix: HuggingFace model prefix ('nat', 'dinat', or '' for ``*Backbone``).
        force: Overwrite an existing output file.
        trust: Allow full unpickling of ``source`` (only for files you trust).
        sha256: Expected SHA-256 of ``source``, or None.

    Returns:
        The written path, the source layout, and the keys dropped because they belong to another
        part of a downstream model (backbone formats) or are training state (whole models).

    Raises:
        NatMMError: Bad format, existing output without ``force``, not a NAT checkpoint, or (whole
            models) not a whole model of the target library.
    """
    if target_format not in FORMATS + MODEL_FORMATS:
        raise NatMMError(
            f'the layout must be one of {FORMATS + MODEL_FORMATS}, got {target_format!r}', '--to'
        )
    path = checkpoint_file_path(destination)
    if target_format in MODEL_FORMATS and path.endswith('.safetensors'):
        raise NatMMError(
            f'a whole model with its meta is written to a .pth file, not safetensors '
            f'(--to {target_format})',
            path,
        )
    check_can_write(path, force, 'destination')
    checkpoint = load_checkpoint(source, trust=trust, sha256=sha256)
    if target_format in MODEL_FORMATS:
        return _write_whole_model(checkpoint, source, path, target_format)
    state_dict, source_format, dropped = to_natmm(unwrap_state_dict(checkpoint, source))
    if not any(marker in state_dict for marker in NATMM_MARKERS):
        raise NatMMError(
            'not a NAT / DiNAT checkpoint: no patch_embed.proj.0.weight after conversion from '
            f'the {source_format} layout; first keys: {list(state_dict)[:5]}',
            source,
        )
    written = save_checkpoint_file(from_natmm(state_dict, target_format, hf_prefix), path)
    return written, source_format, dropped


def _write_whole_model(
    checkpoint: object, source: object, path: str, target_format: str
) -> tuple[str, str, list[str]]:
    """:func:`convert_checkpoint_file` for 'mmdet3' / 'mmseg1'."""
    host = next(host for host, layout in HOST_LAYOUTS.items() if layout == target_format)
    host_checkpoint, source_layout = to_host_checkpoint(checkpoint, host, source)
    check_whole_model(host_checkpoint['state_dict'], host, source)
    # What only resuming a run would use (mmcv 1.x's or mmengine's optimizer, schedulers, ...).
    dropped = []
    if isinstance(checkpoint, Mapping):  # names as str: a file's keys need not all be strings
        dropped = sorted(
            str(key) for key in checkpoint if key not in ('state_dict', 'model', 'meta')
        )
    written = save_checkpoint_file(host_checkpoint, path)
    return written, source_layout, dropped
