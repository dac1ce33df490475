"""Fixes for running the OpenMMLab 2.0 stack (mmengine 0.10.7) on a current PyTorch.

Applied once when ``nat_mm`` is imported, so that users never meet these breakages:

* torch >= 2.6 made ``torch.load(weights_only=True)`` the default. mmengine 0.10.7 loads local
  checkpoints with a bare ``torch.load``, and the checkpoints its own ``Runner`` writes hold
  ``HistoryBuffer`` objects, numpy scalars and arrays (message hub, meta), so ``--resume`` and
  ``load_from`` fail. We re-register mmengine's loader for local files through its own extension
  point (``CheckpointLoader.register_scheme``) with the pre-2.6 behaviour, as mmengine was written
  for. As before torch 2.6: only load checkpoints you trust. (http(s) URLs already go through
  ``torch.hub.load_state_dict_from_url``, which still defaults to ``weights_only=False``.)
"""

from __future__ import annotations

import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader


def load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local-file checkpoint loader, with ``weights_only=False`` made explicit.

    Args:
        filename: Path of a checkpoint written by ``torch.save`` (``~`` is expanded).
        map_location: Same as :func:`torch.load`.

    Returns:
        The unpickled checkpoint (a dict for every mmengine / OpenMMLab checkpoint).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)


def apply() -> None:
    """Install the fixes (idempotent)."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
