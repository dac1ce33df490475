"""Configs and models: reading a config, picking its library, building its model or a backbone."""

from __future__ import annotations

import os

from mmengine.config import Config
from torch import nn

from nat_mm.errors import NatMMError

LIBRARIES = {'mmdet': 'mmdet', 'mmseg': 'mmsegmentation'}  # default_scope -> PyPI package
BACKBONE_FAMILIES = ('nat', 'dinat', 'dinats')


def load_config(path: str | os.PathLike, cfg_options: dict | None = None) -> Config:
    """Reads a config file and merges ``--cfg-options`` into it.

    Args:
        path: A config file, or ``mmdet::...`` / ``mmseg::...`` for one inside those packages.
        cfg_options: ``key=value`` overrides, as ``DictAction`` parses them.

    Raises:
        NatMMError: The file does not exist or cannot be parsed.
    """
    path = os.fspath(path)
    if '::' not in path and not os.path.isfile(path):
        raise NatMMError('config file does not exist', path)
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # mmengine raises many types for a broken config
        raise NatMMError(
            f'cannot read the config: {type(error).__name__}: {error}', path
        ) from error
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
        drop_amp_loss_scale(cfg, cfg_options)
    return cfg


def drop_amp_loss_scale(cfg: Config, cfg_options: dict) -> None:
    """``optim_wrapper.type=OptimWrapper`` on an AMP config (fp32, e.g. on a CPU) also drops its
    ``loss_scale``: only ``AmpOptimWrapper`` takes one, and ``--cfg-options`` cannot delete a key.
    """
    wrapper = cfg.get('optim_wrapper')
    if 'optim_wrapper.type' in cfg_options and wrapper and wrapper.get('type') != 'AmpOptimWrapper':
        wrapper.pop('loss_scale', None)


def library_of(cfg: Config) -> str:
    """'mmdet' or 'mmseg', from the config's ``default_scope``.

    Raises:
        NatMMError: The config belongs to another library (or names none).
    """
    scope = cfg.get('default_scope')
    if scope not in LIBRARIES:
        raise NatMMError(
            f'the config has default_scope={scope!r}; nat_mm runs mmdet or mmseg configs '
            "(default_scope='mmdet' or 'mmseg')",
            cfg.filename,
        )
    return scope


def register_library(library: str) -> None:
    """Registers every module of ``library`` (mmdet or mmseg) in its registries.

    Raises:
        NatMMError: The library is not installed.
    """
    try:
        if library == 'mmdet':
            from mmdet.utils import register_all_modules
        else:
            from mmseg.utils import register_all_modules
    except ImportError as error:
        raise NatMMError(
            f'this config needs {library} (pip install {LIBRARIES[library]}), which cannot be '
            f'imported: {error}',
            library,
        ) from error
    register_all_modules(init_default_scope=False)


def build_model(cfg: Config, revert_sync_bn: bool = True) -> nn.Module:
    """Builds the config's model (mmdet or mmseg, from its ``default_scope``) on the CPU.

    Args:
        cfg: A config read by :func:`load_config`.
        revert_sync_bn: Replace SyncBN by BN, as mmengine's Runner does outside distributed
            runs (a model built by hand keeps SyncBN otherwise, which needs a process group).

    Raises:
        NatMMError: Another library's config, or a model that cannot be built (bad arguments).
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, DefaultScope

    library = library_of(cfg)
    register_library(library)
    if 'model' not in cfg:
        raise NatMMError('the config has no model', cfg.filename)
    try:
        with DefaultScope.overwrite_default_scope(library):
            model = MODELS.build(cfg.model)
    except (ValueError, TypeError, KeyError) as error:
        raise NatMMError(f'cannot build the model: {error}', cfg.filename) from error
    return revert_sync_batchnorm(model) if revert_sync_bn else model


def backbone_presets() -> list[str]:
    """Names :func:`build_backbone` accepts: 'nat-mini' ... 'dinat-large', 'dinats-tiny' ...
    'dinats-large' (DiNAT_s)."""
    from nat_mm.models import DINAT_ARCHS, DINATS_ARCHS, NAT_ARCHS

    archs = {'nat': NAT_ARCHS, 'dinat': DINAT_ARCHS, 'dinats': DINATS_ARCHS}
    return [f'{family}-{arch}' for family in BACKBONE_FAMILIES for arch in archs[family]]


def build_backbone(
    name: str,
    kernel_size: int | None = None,
    dilations: str | None = None,
    drop_path_rate: float = 0.0,
    attn_backend: str | None = None,
) -> nn.Module:
    """A bare NAT / DiNAT / DiNAT_s backbone with a published preset's structure, randomly
    initialised.

    Args:
        name: One of :func:`backbone_presets`, e.g. 'nat-tiny', 'dinat-large'.
        kernel_size: Neighborhood size, or None for the class default (7).
        dilations: DiNAT / DiNAT_s dilation schedule name ('coco', 'ade20k-512', ...), or None
            for the class default.
        drop_path_rate: Stochastic depth (0 for measuring; training configs set their own).
        attn_backend: ``na2d`` backend, or None for the automatic choice.

    Returns:
        The backbone, returning all four stages.

    Raises:
        NatMMError: An unknown preset or a bad argument.
    """
    from nat_mm.models import NAT, DiNAT, DiNATs

    if name not in backbone_presets():
        raise NatMMError(f'unknown backbone {name!r}; expected one of {backbone_presets()}', name)
    family, arch = name.split('-', 1)
    options = dict(arch=arch, drop_path_rate=drop_path_rate, attn_backend=attn_backend)
    if kernel_size is not None:
        options['kernel_size'] = kernel_size
    if dilations is not None:
        options['dilations'] = dilations
    try:
        return {'nat': NAT, 'dinat': DiNAT, 'dinats': DiNATs}[family](**options)
    except ValueError as error:
        raise NatMMError(str(error), name) from error
