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

    Args:
        source: File, HuggingFace folder or URL.
        destination: Output file (``.pth``, ``.bin``, ``.safetensors``) or folder (gets
            ``model.safetensors``).
        target_format: One of :data:`~nat_mm.checkpoint.layouts.FORMATS`.
        hf_prefix: HuggingFace model prefix ('nat', 'dinat', or '' for ``*Backbone``).
        force: Overwrite an existing output file.
        trust: Allow full unpickling of ``source`` (only for files you trust).
        sha256: Expected SHA-256 of ``source``, or None.

    Returns:
        The written path, the source layout, and the keys dropped because they belong to another
        part of a downstream model.

    Raises:
        NatMMError: Bad format, existing output without ``force``, or not a NAT checkpoint.
    """
    if target_format not in FORMATS:
        raise NatMMError(f'the layout must be one of {FORMATS}, got {target_format!r}', '--to')
    path = checkpoint_file_path(destination)
    check_can_write(path, force, 'destination')
    checkpoint = load_checkpoint(source, trust=trust, sha256=sha256)
    state_dict, source_format, dropped = to_natmm(unwrap_state_dict(checkpoint, source))
    if not any(marker in state_dict for marker in NATMM_MARKERS):
        raise NatMMError(
            'not a NAT / DiNAT checkpoint: no patch_embed.proj.0.weight after conversion from '
            f'the {source_format} layout; first keys: {list(state_dict)[:5]}',
            source,
        )
    written = save_checkpoint_file(from_natmm(state_dict, target_format, hf_prefix), path)
    return written, source_format, dropped
