"""Writing files so that a reader never sees half of one, and converting checkpoint files."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import safetensors.torch
import torch

from nat_mm.checkpoint.layouts import FORMATS, from_natmm, to_natmm, unwrap_state_dict
from nat_mm.checkpoint.reading import HF_WEIGHT_FILES, load_checkpoint
from nat_mm.errors import NatMMError

PARTIAL_SUFFIX = '.partial'


def partial_path(path: str) -> str:
    """The temporary name :func:`atomic_write_bytes` writes ``path`` under: hidden, same folder."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f'.{name}{PARTIAL_SUFFIX}')


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (POSIX: the folder entry is data of the folder)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_file(temporary: str, path: str) -> None:
    """Moves a fully written ``temporary`` onto ``path`` atomically and durably.

    ``temporary`` must be in the folder of ``path``'s real location (a symlink at ``path`` is
    written through: its target is replaced, the link stays).
    """
    with open(temporary, 'rb') as f:
        os.fsync(f.fileno())
    target = os.path.realpath(path)
    os.replace(temporary, target)
    fsync_folder(os.path.dirname(target))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> str:
    """Writes ``data`` to ``path`` so that ``path`` is never seen half-written.

    The data goes to a hidden temporary file in the same folder (``.NAME.partial``, opened like
    any new file, so it gets the usual permissions from the umask), is fsynced, then renamed
    over the target. A symlink at ``path`` is written through.

    Returns:
        The path written (``path``).
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = partial_path(target)
    try:
        with open(temporary, 'wb') as f:
            f.write(data)
        publish_file(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def check_can_write(path: str | os.PathLike, force: bool, argument: str) -> None:
    """Refuses to overwrite an existing file without ``force``, and to write over a folder.

    Raises:
        NatMMError: Naming ``argument`` (e.g. '--out') and the path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NatMMError(f'{argument} is a folder, expected a file path', path)
    if os.path.exists(path) and not force:
        raise NatMMError(f'{argument} exists; pass --force to overwrite it', path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NatMMError(f'the folder of {argument} is a file', parent)


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
    checkpoint = load_checkpoint(source, trust=trust)
    state_dict, source_format, dropped = to_natmm(unwrap_state_dict(checkpoint, source))
    if 'patch_embed.proj.0.weight' not in state_dict:
        raise NatMMError(
            'not a NAT / DiNAT checkpoint: no patch_embed.proj.0.weight after conversion from '
            f'the {source_format} layout; first keys: {list(state_dict)[:5]}',
            source,
        )
    written = save_checkpoint_file(from_natmm(state_dict, target_format, hf_prefix), path)
    return written, source_format, dropped
