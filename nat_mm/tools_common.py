"""Helpers shared by ``tools/*.py``: config loading, library choice, input checks, CPU set-up.

Every check raises :class:`ToolError` with a message meant for the user; :func:`run_tool` turns
it into ``error: ...`` on stderr and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import os
import os.path as osp
import sys
import time
from collections.abc import Callable, Iterator

import torch
from mmengine.config import Config

from nat_mm.data import DemoDataSettings

LIBRARIES = ('mmdet', 'mmseg')
_PACKAGE_OF = {'mmdet': 'mmdet', 'mmseg': 'mmsegmentation'}


class ToolError(Exception):
    """A user-facing error of a command-line tool (bad input, missing file, wrong library)."""


def run_tool(main: Callable[[], object]) -> None:
    """Run a tool's ``main``; a :class:`ToolError` becomes a one-line message and exit status 2."""
    try:
        main()
    except ToolError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)


def load_config(path: str, cfg_options: dict | None = None) -> Config:
    """Read a config file and merge ``--cfg-options`` into it.

    Raises:
        ToolError: The file does not exist or cannot be parsed.
    """
    # 'mmdet::...' names a config inside an installed package; mmengine resolves it.
    if '::' not in path and not osp.isfile(path):
        raise ToolError(f'config file {path!r} does not exist')
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # mmengine raises many types for a broken config
        raise ToolError(f'cannot read config {path!r}: {type(error).__name__}: {error}') from error
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def library_of(cfg: Config) -> str:
    """'mmdet' or 'mmseg', from the config's ``default_scope``.

    Raises:
        ToolError: The config belongs to another library (or names none).
    """
    scope = cfg.get('default_scope')
    if scope not in LIBRARIES:
        raise ToolError(
            f'config has default_scope={scope!r}; these tools run mmdet or mmseg configs '
            f"(default_scope='mmdet' or 'mmseg')"
        )
    return scope


def register_library(library: str) -> None:
    """Import nat_mm and register every module of ``library`` in its registries.

    Raises:
        ToolError: The library is not installed.
    """
    import nat_mm  # noqa: F401  (registers NAT / DiNAT and applies the compat fixes)
    from nat_mm.engine import install_atomic_checkpointing

    install_atomic_checkpointing()
    try:
        if library == 'mmdet':
            from mmdet.utils import register_all_modules
        else:
            from mmseg.utils import register_all_modules
    except ImportError as error:
        raise ToolError(
            f'this config needs {library} ({_PACKAGE_OF[library]}), which cannot be imported: '
            f'{error}'
        ) from error
    register_all_modules(init_default_scope=False)


def set_work_dir(cfg: Config, work_dir: str | None, config_path: str) -> None:
    """Upstream priority: ``--work-dir`` > ``work_dir`` in the file > ./work_dirs/<config name>."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def _dataset_cfgs(dataset_cfg: dict) -> Iterator[dict]:
    """Every concrete dataset config, looking through wrappers (RepeatDataset, Concat...)."""
    if 'dataset' in dataset_cfg:
        yield from _dataset_cfgs(dataset_cfg['dataset'])
    elif 'datasets' in dataset_cfg:
        for child in dataset_cfg['datasets']:
            yield from _dataset_cfgs(child)
    else:
        yield dataset_cfg


def check_dataset_folders(cfg: Config, dataloader_keys: tuple[str, ...]) -> None:
    """Fail early, naming the folder, when a dataloader's ``data_root`` does not exist.

    Raises:
        ToolError: A ``data_root`` (or an annotation file under it) is missing.
    """
    for key in dataloader_keys:
        loader = cfg.get(key)
        if not loader:
            continue
        for dataset in _dataset_cfgs(loader['dataset']):
            root = dataset.get('data_root')
            if root and not osp.isdir(root):
                raise ToolError(
                    f'{key}: dataset folder data_root={root!r} does not exist '
                    '(see docs/usage.md; the demo data is made by tools/make_data.py)'
                )
            ann_file = dataset.get('ann_file')
            if ann_file:
                path = ann_file if osp.isabs(ann_file) else osp.join(root or '', ann_file)
                if not osp.isfile(path):
                    raise ToolError(f'{key}: annotation file {path!r} does not exist')


def check_amp_possible(amp: bool) -> None:
    """``--amp`` needs a GPU: mmengine's AmpOptimWrapper asserts CUDA (or NPU/MLU)."""
    if amp and not torch.cuda.is_available():
        raise ToolError('--amp needs a CUDA GPU; on a CPU train in fp32 (drop --amp)')


def enable_amp(cfg: Config) -> None:
    """Switch the config's optimizer wrapper to AMP with dynamic loss scaling."""
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
        return
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def prepare_launcher(cfg: Config, launcher: str) -> None:
    """Set ``cfg.launcher`` and, without a GPU, make distributed runs work on gloo.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` and its DDP wrapper passes
    ``device_ids=[LOCAL_RANK]``; both fail on a CPU. Here the process group is started with
    gloo first (so mmengine skips its own init) and DDP gets ``device_ids=None``.
    """
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise ToolError(f'--launcher {launcher} on a machine without GPU is not supported; '
                        'use --launcher pytorch (torchrun) for CPU runs')  # fmt: skip
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('device_ids', None)
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def set_local_rank(local_rank: int) -> None:
    """Upstream behaviour: ``--local-rank`` from old launchers fills LOCAL_RANK if unset."""
    os.environ.setdefault('LOCAL_RANK', str(local_rank))


def _checkpoint_state_dict(checkpoint_path: str) -> dict:
    from mmengine.runner.checkpoint import _load_checkpoint

    if not osp.isfile(checkpoint_path):
        raise ToolError(f'checkpoint file {checkpoint_path!r} does not exist')
    try:
        checkpoint = _load_checkpoint(checkpoint_path, map_location='cpu')
    except Exception as error:
        raise ToolError(
            f'cannot read checkpoint {checkpoint_path!r}: {type(error).__name__}: {error}'
        ) from error
    if not isinstance(checkpoint, dict):
        raise ToolError(f'checkpoint {checkpoint_path!r} holds a {type(checkpoint).__name__}, '
                        'expected a dict with a state_dict')  # fmt: skip
    state = checkpoint.get('state_dict', checkpoint)
    # DDP-saved weights carry a 'module.' prefix; mmengine strips it the same way when loading.
    return {key.removeprefix('module.'): value for key, value in state.items()}


def _listing(keys: list[str]) -> str:
    # Every key, not a sample: a mismatch is only fixable when all of it is in view.
    return ', '.join(keys)


def check_checkpoint_matches(cfg: Config, checkpoint_path: str, library: str) -> None:
    """Build the config's model and compare its state dict with the checkpoint's, strictly.

    Raises:
        ToolError: The checkpoint is missing/unreadable, or its keys or shapes differ; the
            message names the missing, unexpected and mis-shaped keys.
    """
    from mmengine.registry import MODELS, DefaultScope

    state = _checkpoint_state_dict(checkpoint_path)
    with DefaultScope.overwrite_default_scope(library):
        model = MODELS.build(cfg.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f'{key} (checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)})'
        for key in set(expected) & set(state)
        if hasattr(state[key], 'shape') and state[key].shape != expected[key].shape
    )
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys: {_listing(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: {_listing(unexpected)}')
    if mis_shaped:
        problems.append(f'{len(mis_shaped)} keys with other shapes: {_listing(mis_shaped)}')
    if problems:
        raise ToolError(
            f'checkpoint {checkpoint_path!r} does not match the config model: '
            + '; '.join(problems)
        )


def generate_demo_data(
    root: str, settings: DemoDataSettings, force: bool = False, quiet: bool = False
) -> dict:
    """Generate (or reuse) the demo data under ``root`` with a progress bar; return the summary.

    Raises:
        ToolError: ``root`` holds data the generator did not write.
    """
    from mmengine.utils import ProgressBar

    from nat_mm.data import generate_demo_datasets, read_settings

    if not force and read_settings(root) == settings:
        if not quiet:
            print(f'reusing the demo data in {root} (same settings; --force to rewrite)')
        return {'reused': True}
    start = time.perf_counter()
    if not quiet:
        print(f'generating the demo data in {root}: {settings}')
    bar = None if quiet else ProgressBar(settings.num_train + settings.num_val)
    try:
        summary = generate_demo_datasets(
            root, settings, progress=None if bar is None else bar.update, force=True
        )
    except ValueError as error:
        raise ToolError(str(error)) from error
    if not quiet:
        train, val = summary['train'], summary['val']
        print(
            f'\nwrote {train["images"]} train images ({train["objects"]} objects) and '
            f'{val["images"]} val images ({val["objects"]} objects) in '
            f'{time.perf_counter() - start:.1f}s'
        )
    return summary
