"""Reading checkpoint files without running code from them.

Every nat_mm path that reads a checkpoint (backbone ``init_cfg``, the runner's ``load_from`` and
``--resume``, the tools) goes through :func:`load_checkpoint`:

- ``.safetensors`` files hold tensors only and are read with safetensors.
- zip-format torch files (everything ``torch.save`` has written since torch 1.6) are read by
  torch's weights-only unpickler, with the user allowlist replaced by nat_mm's inert records for
  numpy, mmengine's ``HistoryBuffer`` and ``argparse.Namespace``, validated and built after
  unpickling (:mod:`nat_mm.checkpoint.unpickling`; docs/checkpoints.md has the list and why each
  entry cannot be abused).
- legacy (non-zip) torch files are refused: torch's reader for them looks up and may write
  source files for the classes a file names, so only ``trust`` reads them.
- ``trust=True`` (``--trust-checkpoint`` on the tools) unpickles with the full pickle module, for
  old checkpoints the user trusts; it is never implied.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.serialization
from mmengine.logging import print_log

from nat_mm.checkpoint.unpickling import (
    RefusedRecord,
    allowed_global_names,
    materialize,
    only_nat_mm_safe_globals,
)
from nat_mm.errors import NatMMError

__all__ = [
    'HF_WEIGHT_FILES',
    'TRUST_HINT',
    'UnsafeCheckpointError',
    'allowed_global_names',
    'load_checkpoint',
    'resolve_checkpoint_path',
]

HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
TRUST_HINT = (
    'if you trust the file, allow full unpickling with --trust-checkpoint (tools), '
    "init_cfg=dict(type='Pretrained', checkpoint=..., trust=True) (backbones), "
    'trust_checkpoint=True (configs run by nat_mm) or trust=True (nat_mm.checkpoint)'
)
FORCE_WEIGHTS_ONLY = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'


class UnsafeCheckpointError(NatMMError, pickle.UnpicklingError):
    """A checkpoint needs something the safe loader does not build."""


# ----------------------------------------------------------------------------- reading files


def resolve_checkpoint_path(source: str | os.PathLike, sha256: str | None = None) -> str:
    """The local file ``source`` names: itself, a HuggingFace folder's weight file, or a download.

    Args:
        source: See :func:`load_checkpoint`.
        sha256: Expected SHA-256 (hex, 8 to 64 digits) of the file, or None.

    Raises:
        NatMMError: Nothing readable there, an empty file, a hash that differs, or an
            unsupported URL scheme.
    """
    from nat_mm.checkpoint.download import check_sha256, download_checkpoint

    source = os.fspath(source)
    if source.startswith(('http://', 'https://')):
        return download_checkpoint(source, sha256)
    if '://' in source:
        raise NatMMError(
            'unsupported checkpoint scheme: give a local path or an http(s) URL', source
        )
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        existing = [name for name in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
        if not existing:
            raise NatMMError(f'checkpoint folder holds none of {list(HF_WEIGHT_FILES)}', source)
        path = os.path.join(path, existing[0])
    if not os.path.isfile(path):
        raise NatMMError('checkpoint file does not exist', source)
    if os.path.getsize(path) == 0:
        raise NatMMError('checkpoint file is empty (0 bytes)', source)
    if sha256 is not None:
        check_sha256(path, sha256)
    return path


def load_checkpoint(
    source: str | os.PathLike,
    map_location: Any = 'cpu',
    trust: bool = False,
    sha256: str | None = None,
) -> Any:
    """Reads a checkpoint without running code from it (unless ``trust``).

    Args:
        source: A ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file, a HuggingFace folder
            (``model.safetensors`` or ``pytorch_model.bin``), or an ``http(s)://`` URL
            (downloaded once into a cache, see :func:`nat_mm.checkpoint.download_checkpoint`).
        map_location: As for :func:`torch.load`.
        trust: Unpickle with the full pickle module: only for files you trust.
        sha256: Expected SHA-256 of the file (hex, 8 to 64 leading digits), or None.

    Returns:
        What the file holds (a state dict, or a dict wrapping one).

    Raises:
        UnsafeCheckpointError: The file needs a global outside the allowlist (named in the
            message, with the opt-in).
        NatMMError: The file is missing, empty or unreadable.
    """
    path = resolve_checkpoint_path(source, sha256)
    if path.endswith('.safetensors'):
        device = map_location if isinstance(map_location, str) else 'cpu'
        try:
            return safetensors.torch.load_file(path, device=device)
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            raise _unreadable(error, source) from error
    if trust:
        return _load_trusted(path, map_location, source)
    with open(path, 'rb') as file:  # one open file: what is checked is what is read
        if not torch.serialization._is_zipfile(file):
            if file.read(1) != pickle.PROTO:  # a legacy file starts with a pickle
                raise NatMMError(
                    'cannot read the checkpoint: neither a torch file (zip or legacy) nor '
                    'safetensors',
                    source,
                )
            raise UnsafeCheckpointError(
                'refusing to unpickle the checkpoint: it is a legacy (non-zip) torch file, '
                'whose reader can look up and write source files for the classes it names; '
                f're-save it with torch.save after loading it trusted; {TRUST_HINT}',
                source,
            )
        try:
            with only_nat_mm_safe_globals():
                loaded = torch.load(file, map_location=map_location, weights_only=True, mmap=False)
            return materialize(loaded)
        except RefusedRecord as error:
            raise _refused(str(error), source) from None
        except pickle.UnpicklingError as error:
            raise _refused(_weights_only_reason(str(error)), source) from None
        except Exception as error:
            # A malformed or hostile file makes torch or an allowlisted function raise anything
            # (an assert for a persistent id that is no tuple, LookupError from _codecs.encode, a
            # missing memo entry, ...): it is unreadable, and nothing it asked for was built.
            raise _unreadable(error, source) from error


def _load_trusted(path: str, map_location: Any, source: str | os.PathLike) -> Any:
    print_log(f'Unpickling {path} with the full pickle module (trusted)', logger='current')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except pickle.UnpicklingError as error:
        if os.environ.get(FORCE_WEIGHTS_ONLY, '0').lower() in ('1', 'y', 'yes', 'true'):
            raise NatMMError(
                f'{FORCE_WEIGHTS_ONLY} is set in the environment, so torch reads even a trusted '
                f'file weights-only, and this one needs more: '
                f'{_weights_only_reason(str(error))}; unset it to load the file trusted',
                source,
            ) from None
        raise _unreadable(error, source) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _unreadable(error, source) from error


def _weights_only_reason(message: str) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    found = re.search(r'GLOBAL (\S+) was not an allowed global', message)
    if found:
        return f'the file needs the global {found.group(1)}'
    found = re.search(r'whose module (\S+) is blocked', message)
    if found:
        return f'the file needs the module {found.group(1)}'
    inner = message.split('WeightsUnpickler error: ', 1)[-1].strip()
    return f"the file asks for what torch's weights-only unpickler refuses: {inner.splitlines()[0]}"


def _refused(reason: str, source: str | os.PathLike) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f'refusing to unpickle the checkpoint: {reason}, which nat_mm does not build '
        f'because loading it could run code from the file; {TRUST_HINT}',
        source,
    )


def _unreadable(error: BaseException, source: str | os.PathLike) -> NatMMError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return NatMMError(f'cannot read the checkpoint: {type(error).__name__}: {first_line}', source)
