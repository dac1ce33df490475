"""Reading checkpoint files without running code from them.

Every nat_mm path that reads a checkpoint (backbone ``init_cfg``, the runner's ``load_from`` and
``--resume``, the tools) goes through :func:`load_checkpoint`:

- ``.safetensors`` files hold tensors only and are read with safetensors.
- Everything else is unpickled by a restricted unpickler (``torch.load`` with nat_mm's own
  ``pickle_module``): it builds only the globals of :data:`ALLOWED_GLOBALS` and refuses any
  other before the object is built, so a file cannot run code. The list is what torch's own
  ``weights_only=True`` loads for tensors, plus what nat_mm's, mmengine's and the published
  NAT / DiNAT checkpoints hold (docs/checkpoints.md has the list and why each entry is safe).
  It is the same on every torch version: nothing depends on torch's changing defaults, and
  nothing global (torch's safe globals, mmengine's loaders) is touched.
- ``trust=True`` (``--trust-checkpoint`` on the tools) unpickles with the full pickle module, for
  old checkpoints the user trusts; it is never implied.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import collections
import functools
import os
import pickle
import types
from collections.abc import Callable
from typing import Any, ClassVar

import safetensors
import safetensors.torch
import torch
import torch._utils
from mmengine.logging import print_log

from nat_mm.errors import NatMMError

HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
TRUST_HINT = (
    'if you trust the file, allow full unpickling with --trust-checkpoint (tools), '
    "init_cfg=dict(type='Pretrained', checkpoint=..., trust=True) (backbones), "
    'trust_checkpoint=True (configs run by nat_mm) or trust=True (nat_mm.checkpoint)'
)


class UnsafeCheckpointError(NatMMError, pickle.UnpicklingError):
    """A checkpoint needs a global the restricted unpickler does not build."""


# ----------------------------------------------------------------------------- the allowlist


def _history_buffer_statistic(owner: object, name: str) -> Callable:
    """``getattr`` as mmengine's checkpoints use it, and only that way.

    mmengine's ``HistoryBuffer`` keeps its statistics methods in a dict that pickles (protocol 2)
    as ``getattr(HistoryBuffer, 'min')``; a general ``getattr`` would reach any attribute of any
    object the file builds.
    """
    from mmengine.logging.history_buffer import HistoryBuffer

    # The class fills _statistics_methods in __init__, which unpickling does not call.
    statistics = {'min', 'max', 'current', 'mean', *HistoryBuffer._statistics_methods}
    if owner is not HistoryBuffer or name not in statistics:
        raise UnsafeCheckpointError(
            f'refusing getattr({owner!r}, {name!r}): only the statistics methods of '
            f"mmengine's HistoryBuffer are allowed"
        )
    return getattr(HistoryBuffer, name)


def _latin1_encode(text: str, encoding: str = 'utf-8') -> bytes:
    """``_codecs.encode`` as pickle protocol 2 writes bytes: ``encode(str, 'latin1')``."""
    if codecs.lookup(encoding).name not in ('latin-1', 'iso8859-1'):
        raise UnsafeCheckpointError(f'refusing _codecs.encode with encoding {encoding!r}')
    return codecs.encode(text, encoding)


def _numpy_globals() -> dict[str, Any]:
    """numpy arrays and scalars (mmengine's message hub); module names of numpy 1 and 2."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray

    entries = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype}
    # Files written with numpy 1 name numpy.core, with numpy 2 numpy._core: the same functions.
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries[f'{module}._reconstruct'] = multiarray._reconstruct
        entries[f'{module}.scalar'] = multiarray.scalar
    # numpy >= 1.25 may name dtype classes (numpy.dtypes.Float64DType) instead of numpy.dtype.
    dtypes = getattr(np, 'dtypes', None)
    for name in dir(dtypes) if dtypes is not None else ():
        if name.endswith('DType'):
            entries[f'numpy.dtypes.{name}'] = getattr(dtypes, name)
    return entries


def _tensor_globals() -> dict[str, Any]:
    """What torch.save writes for dense tensors, parameters, sizes, devices and dtypes."""
    entries: dict[str, Any] = {
        f'torch._utils.{name}': getattr(torch._utils, name)
        for name in (
            '_rebuild_tensor',
            '_rebuild_tensor_v2',
            '_rebuild_tensor_v3',
            '_rebuild_parameter',
            '_rebuild_parameter_with_state',
        )
        if hasattr(torch._utils, name)  # _rebuild_tensor_v3 appeared in torch 2.1
    }
    entries['torch.Size'] = torch.Size
    entries['torch.device'] = torch.device
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            entries[f'torch.{name}'] = value
    return entries


def _allowed_globals() -> dict[str, Any]:
    from mmengine.logging.history_buffer import HistoryBuffer

    return {
        **_tensor_globals(),
        **_numpy_globals(),
        'collections.OrderedDict': collections.OrderedDict,
        'builtins.set': set,
        'builtins.frozenset': frozenset,
        'builtins.slice': slice,
        'builtins.complex': complex,
        'builtins.bytearray': bytearray,
        'builtins.getattr': _history_buffer_statistic,
        '_codecs.encode': _latin1_encode,
        'mmengine.logging.history_buffer.HistoryBuffer': HistoryBuffer,
        # timm / the original classification training scripts save their arguments.
        'argparse.Namespace': argparse.Namespace,
    }


def allowed_global_names() -> list[str]:
    """The names the restricted unpickler builds, sorted (for docs and error messages)."""
    return sorted(_allowed_globals())


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` returns only allowlisted globals."""

    _allowed: ClassVar[dict[str, Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 files name Python 2 modules (__builtin__, copy_reg); map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._allowed.get(f'{module}.{name}')
        if found is None:
            raise UnsafeCheckpointError(f'the file needs the global {module}.{name}')
        return found


@functools.cache
def _restricted_pickle_module() -> types.ModuleType:
    """A stand-in for the ``pickle`` module that torch.load uses to unpickle."""
    allowed = {'_allowed': _allowed_globals()}
    unpickler = type('RestrictedUnpickler', (_RestrictedUnpickler,), allowed)
    module = types.ModuleType('nat_mm_restricted_pickle')
    module.Unpickler = unpickler
    module.load = lambda file, **options: unpickler(file, **options).load()
    module.UnpicklingError = pickle.UnpicklingError
    return module


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
    try:
        if path.endswith('.safetensors'):
            device = map_location if isinstance(map_location, str) else 'cpu'
            return safetensors.torch.load_file(path, device=device)
        if trust:
            print_log(f'Unpickling {path} with the full pickle module (trusted)', logger='current')
            return torch.load(path, map_location=map_location, weights_only=False)
        return torch.load(
            path,
            map_location=map_location,
            weights_only=False,  # the restricted pickle module below is what keeps it safe
            pickle_module=_restricted_pickle_module(),
        )
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(
            f'refusing to unpickle the checkpoint: {error.what}, which nat_mm does not build '
            f'because loading it could run code from the file; {TRUST_HINT}',
            source,
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            safetensors.SafetensorError) as error:  # fmt: skip
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
        raise NatMMError(
            f'cannot read the checkpoint: {type(error).__name__}: {first_line}', source
        ) from error
