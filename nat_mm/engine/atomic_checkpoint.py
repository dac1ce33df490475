"""Crash-safe checkpoints for mmengine's Runner.

mmengine 0.10.7 writes checkpoints in place (``LocalBackend.put`` opens the final path with
'wb'), so a run killed while saving leaves a truncated ``iter_N.pth``; and it writes the
``last_checkpoint`` pointer the same way, so a kill there leaves an empty pointer that makes
``--resume`` fail. Two small patches fix both:

- ``LocalBackend.put`` / ``put_text`` write to a temporary file in the same folder, fsync it and
  ``os.replace`` it over the target: a reader sees the old file or the new one, never a part.
- ``find_latest_checkpoint`` (as used by ``Runner.load_or_resume``) falls back to the newest
  complete ``iter_*.pth`` / ``epoch_*.pth`` when the pointer is empty or names a missing file.
"""

from __future__ import annotations

import os
import os.path as osp
import re
import tempfile
from pathlib import Path

import mmengine.runner.checkpoint as mmengine_checkpoint
import mmengine.runner.runner as mmengine_runner
from mmengine.fileio.backends.local_backend import LocalBackend
from mmengine.logging import print_log

_CHECKPOINT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
_original_find_latest = mmengine_checkpoint.find_latest_checkpoint


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written.

    Args:
        data: The file's content.
        path: Destination; its folder is created if missing.
    """
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Same folder as the target: os.replace is atomic only within one file system.
    descriptor, temporary = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', dir=folder)
    try:
        with os.fdopen(descriptor, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if osp.exists(temporary):
            os.remove(temporary)
        raise


def _atomic_put(self: LocalBackend, obj: bytes, filepath: str | Path) -> None:
    atomic_write_bytes(obj, filepath)


def _atomic_put_text(
    self: LocalBackend, obj: str, filepath: str | Path, encoding: str = 'utf-8'
) -> None:
    atomic_write_bytes(obj.encode(encoding), filepath)


def newest_checkpoint_in(folder: str) -> str | None:
    """The ``iter_N.pth`` / ``epoch_N.pth`` in ``folder`` with the largest N, or None."""
    if not osp.isdir(folder):
        return None
    numbered = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match:
            numbered.append((int(match.group(2)), name))
    return osp.join(folder, max(numbered)[1]) if numbered else None


def find_latest_checkpoint(path: str) -> str | None:
    """mmengine's ``find_latest_checkpoint`` that survives an empty or stale pointer file.

    Args:
        path: The work dir.

    Returns:
        The checkpoint to resume from, or None when there is none.
    """
    pointed = _original_find_latest(path)
    if pointed and osp.isfile(pointed):
        return pointed
    fallback = newest_checkpoint_in(path)
    if pointed is not None:
        print_log(
            f'last_checkpoint in {path} names {pointed!r}, which does not exist; '
            f'resuming from {fallback} instead',
            logger='current',
        )
    return fallback


def install_atomic_checkpointing() -> None:
    """Apply both patches (idempotent). Called by ``import nat_mm`` and by ``tools/train.py``."""
    LocalBackend.put = _atomic_put
    LocalBackend.put_text = _atomic_put_text
    mmengine_checkpoint.find_latest_checkpoint = find_latest_checkpoint
    # The Runner imported the function by name, so its module's reference is patched too.
    mmengine_runner.find_latest_checkpoint = find_latest_checkpoint
