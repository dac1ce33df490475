"""Downloading checkpoints given by URL: once per machine, verified, safe under torchrun.

Files land in torch's hub cache (``$TORCH_HOME/hub/checkpoints``) under a name that starts with a
hash of the URL, so two files both called ``model.safetensors`` never collide. In a distributed
run rank 0 downloads while the other ranks wait at a barrier, then everyone reads the same file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from urllib.parse import urlparse

import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.logging import print_log

from nat_mm.errors import NatMMError

_HEX_DIGEST = re.compile(r'[0-9a-fA-F]{8,64}')
# Below 16 hex digits (64 bits) one machine can forge a file whose hash starts with the prefix.
_SAFE_PREFIX_DIGITS = 16


def cached_download_path(url: str) -> str:
    """Where :func:`download_checkpoint` keeps ``url``."""
    name = os.path.basename(urlparse(url).path) or 'checkpoint'
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(torch.hub.get_dir(), 'checkpoints', f'{digest}-{name}')


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, path: str) -> None:
    """Download into a temporary file beside ``path``, then rename: never a partial file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    print_log(f'Downloading {url} to {path}', logger='current')
    descriptor, temporary = tempfile.mkstemp(prefix='.download-', dir=folder)
    os.close(descriptor)
    try:
        torch.hub.download_url_to_file(url, temporary, progress=True)
        os.replace(temporary, path)
    except Exception as error:
        raise NatMMError(f'cannot download the checkpoint: {error}', url) from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_sha256(path: str, sha256: str) -> None:
    """Raises NatMMError unless the file's SHA-256 starts with ``sha256`` (8 to 64 hex digits).

    A prefix of fewer than 16 digits is logged as a WARNING: it catches a corrupted file, not one
    a hostile host made to match it.
    """
    if not _HEX_DIGEST.fullmatch(sha256):
        raise NatMMError(f'sha256 must be 8 to 64 hex digits, got {sha256!r}', 'sha256')
    if len(sha256) < _SAFE_PREFIX_DIGITS:
        print_log(
            f'sha256={sha256!r} is a prefix of {len(sha256)} hex digits: it checks the integrity '
            f'of {path}, not that a hostile host did not forge it; give all 64 digits for that',
            logger='current',
            level=logging.WARNING,
        )
    actual = file_sha256(path)
    if not actual.startswith(sha256.lower()):
        raise NatMMError(f'the checkpoint has SHA-256 {actual}, expected {sha256}', path)


def download_checkpoint(url: str, sha256: str | None = None) -> str:
    """The local copy of ``url``, downloaded first if needed (rank 0 first, then a barrier).

    Args:
        url: ``http(s)://`` address of a checkpoint file.
        sha256: Expected hex SHA-256 of the file, or None to skip the check. A prefix of at
            least 8 digits checks integrity; against a hostile host give all 64.

    Returns:
        The path of the cached file.

    Raises:
        NatMMError: The download failed, or the file's hash differs from ``sha256`` (the
            downloaded file is then removed, so the next run downloads it again).
    """
    if sha256 is not None and not _HEX_DIGEST.fullmatch(sha256):
        raise NatMMError(f'sha256 must be 8 to 64 hex digits, got {sha256!r}', 'sha256')
    path = cached_download_path(url)
    rank, world_size = get_dist_info()
    failure = None
    if rank == 0 and not os.path.isfile(path):
        try:
            _fetch(url, path)
        except NatMMError as error:
            failure = error  # raised after the barrier, so the other ranks do not wait forever
    if world_size > 1:
        barrier()  # the other ranks read the file rank 0 has just written
    if failure is not None:
        raise failure
    if not os.path.isfile(path):
        raise NatMMError('rank 0 could not download the checkpoint', url)
    if sha256 is not None:
        try:
            check_sha256(path, sha256)
        except NatMMError as error:
            if rank == 0:
                os.remove(path)  # so that the next run downloads it again
            raise NatMMError(f'{error.what}; the download was removed', url) from None
    return path
