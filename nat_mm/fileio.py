"""Writing files so that a reader never sees half of one, and refusing to overwrite."""

from __future__ import annotations

import os

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
