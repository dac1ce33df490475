"""Training and testing runners for mmdet / mmseg configs, with every input checked first.

:func:`build_train_runner` and :func:`build_test_runner` do what mmdet's and mmseg's
``tools/train.py`` / ``test.py`` do (the library is picked from the config's ``default_scope``),
plus nat_mm's runtime (:func:`use_nat_mm_runtime`), distributed runs on CPUs (gloo), and checks
of every path before any work starts.
"""

from __future__ import annotations

import os
import warnings
from copy import deepcopy

import torch
from mmengine.config import Config, ConfigDict

from nat_mm.apis.config import library_of, load_config, register_library
from nat_mm.apis.datasets import check_dataset_files
from nat_mm.engine.resume import (
    checkpoint_folders,
    find_resume_checkpoint,
    is_run_checkpoint_name,
)
from nat_mm.errors import NatMMError
from nat_mm.fileio import check_can_write

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def use_nat_mm_runtime(cfg: Config, trust: bool = False) -> None:
    """Switches a config to nat_mm's runner and checkpoint hook (docs/checkpoints.md).

    ``SafeLoadRunner`` reads checkpoints without running code and loads them strictly;
    ``CrashSafeCheckpointHook`` saves them atomically. A config naming another runner keeps it
    (with a warning: its loading is then mmengine's). ``trust`` allows full unpickling.
    """
    runner_type = cfg.get('runner_type', 'Runner')
    if runner_type in ('Runner', 'SafeLoadRunner'):
        cfg.runner_type = 'SafeLoadRunner'
    else:
        warnings.warn(
            f'runner_type={runner_type!r}: checkpoints are loaded by that runner, not by '
            "nat_mm's SafeLoadRunner",
            stacklevel=2,
        )
    hooks = cfg.setdefault('default_hooks', ConfigDict())
    checkpoint_hook = hooks.get('checkpoint')
    if checkpoint_hook is not None and checkpoint_hook.get('type') in ('CheckpointHook', None):
        checkpoint_hook['type'] = 'CrashSafeCheckpointHook'
    cfg.trust_checkpoint = bool(trust or cfg.get('trust_checkpoint', False))


def set_work_dir(cfg: Config, work_dir: str | None, config_path: str) -> str:
    """Upstream priority: ``work_dir`` argument > ``work_dir`` in the file > ./work_dirs/<name>.

    Raises:
        NatMMError: The work dir is a file.
    """
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        name = os.path.splitext(os.path.basename(config_path))[0]
        cfg.work_dir = os.path.join('./work_dirs', name)
    if os.path.exists(cfg.work_dir) and not os.path.isdir(cfg.work_dir):
        raise NatMMError('the work dir is a file, expected a folder', cfg.work_dir)
    return cfg.work_dir


def prepare_launcher(cfg: Config, launcher: str) -> None:
    """Sets ``cfg.launcher`` and, without a GPU, makes distributed runs work on gloo.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` and its DDP wrapper passes
    ``device_ids=[LOCAL_RANK]``; both fail on a CPU. Here the process group is started with
    gloo first (so mmengine skips its own init) and DDP gets ``device_ids=None``.
    """
    if launcher not in LAUNCHERS:
        raise NatMMError(f'the launcher must be one of {LAUNCHERS}, got {launcher!r}', '--launcher')
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise NatMMError(
            f'--launcher {launcher} needs GPUs; use --launcher pytorch (torchrun) on CPUs',
            '--launcher',
        )
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('device_ids', None)
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def check_backbone(cfg: Config, pretrained: bool) -> None:
    """Builds a NAT / DiNAT backbone alone (no weights), so that a bad argument is reported as
    bad input before the runner builds datasets and the rest of the model; with ``pretrained``
    (training: mmengine initialises the weights even when resuming), checks that a local
    pre-trained checkpoint it names exists.

    Raises:
        NatMMError: The backbone's arguments are invalid (the message names the argument), or
            its pre-trained checkpoint is missing.
    """
    from mmengine.registry import MODELS, DefaultScope

    from nat_mm.checkpoint.reading import resolve_checkpoint_path

    backbone = cfg.get('model', {}).get('backbone')
    if not backbone or backbone.get('type') not in ('NAT', 'DiNAT'):
        return
    options = {key: value for key, value in backbone.items() if key != 'init_cfg'}
    try:
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            MODELS.build(options)
    except (ValueError, TypeError) as error:
        raise NatMMError(f'model.backbone: {error}', cfg.filename) from error
    init_cfg = backbone.get('init_cfg') or {}
    source = init_cfg.get('checkpoint') if init_cfg.get('type') == 'Pretrained' else None
    source = source if pretrained else None
    if source and not str(source).startswith(('http://', 'https://')):
        try:
            resolve_checkpoint_path(source)
        except NatMMError as error:
            raise NatMMError(
                f'model.backbone.init_cfg: {error.what} (download the ImageNet weights, '
                'configs/README.md has the links)',
                source,
            ) from None


def _build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


def _check_fresh_work_dir(work_dir: str, force: bool) -> None:
    """A run that is not resumed must not overwrite the checkpoints of an earlier one."""
    if not os.path.isdir(work_dir) or force:
        return
    earlier = sorted(name for name in os.listdir(work_dir) if is_run_checkpoint_name(name))
    if earlier:
        raise NatMMError(
            f'the work dir holds an earlier run ({", ".join(earlier[:4])}'
            f'{", ..." if len(earlier) > 4 else ""}); pass --resume to continue it or --force to '
            'start over (its checkpoints are overwritten)',
            work_dir,
        )


def build_train_runner(
    config: str,
    work_dir: str | None = None,
    resume: str | bool = False,
    amp: bool = False,
    auto_scale_lr: bool = False,
    cfg_options: dict | None = None,
    launcher: str = 'none',
    trust: bool = False,
    force: bool = False,
):
    """The configured mmengine Runner for training, after every input check.

    Args:
        config: Config file (mmdet or mmseg).
        work_dir: Where logs and checkpoints go (default: the config's, or ./work_dirs/NAME).
        resume: False; True to resume from the newest complete checkpoint of the work dir; or a
            checkpoint path.
        amp: Mixed precision (needs a GPU).
        auto_scale_lr: Scale the learning rate by the total batch size.
        cfg_options: Config overrides.
        launcher: 'none', 'pytorch' (torchrun), 'slurm' or 'mpi'.
        trust: Allow full unpickling of the checkpoint resumed / loaded (files you trust only).
        force: Train into a work dir that holds an earlier run's checkpoints, overwriting them.

    Raises:
        NatMMError: Any bad input (named in the message), before anything is trained.
    """
    cfg = load_config(config, cfg_options)
    library = library_of(cfg)
    if amp and not torch.cuda.is_available():
        raise NatMMError('mixed precision needs a CUDA GPU; on a CPU train in fp32', '--amp')
    register_library(library)
    check_backbone(cfg, pretrained=True)
    check_dataset_files(cfg, ('train_dataloader', 'val_dataloader'))
    work_dir = set_work_dir(cfg, work_dir, config)
    use_nat_mm_runtime(cfg, trust)
    if amp and cfg.optim_wrapper.get('type') != 'AmpOptimWrapper':
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise NatMMError('the config has no auto_scale_lr.base_batch_size', '--auto-scale-lr')
        cfg.auto_scale_lr.enable = True
    if resume is True:
        # Chosen now (once), so that a work dir with only broken files fails before anything
        # is built; None: nothing to resume, a fresh start (logged).
        out_dir = (cfg.get('default_hooks') or {}).get('checkpoint', {}).get('out_dir')
        found = find_resume_checkpoint(work_dir, checkpoint_folders(work_dir, [out_dir]))
        cfg.resume, cfg.load_from = found is not None, found
    elif resume:
        if not os.path.isfile(resume):
            raise NatMMError('the checkpoint to resume from does not exist', resume)
        cfg.resume, cfg.load_from = True, resume
    else:
        _check_fresh_work_dir(work_dir, force)
    prepare_launcher(cfg, launcher)
    return _build_runner(cfg)


def enable_visualization(
    cfg: Config, library: str, show: bool, show_dir: str | None, wait_time: float
) -> None:
    """Turn on the visualization hook the way each library's test.py does."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise NatMMError(
            '--show / --show-dir need default_hooks.visualization in the config', cfg.filename
        )
    hook['draw'] = True
    if show:
        hook['show'] = True
        hook['wait_time'] = wait_time
    if show_dir:
        if library == 'mmdet':
            hook['test_out_dir'] = show_dir
        else:
            cfg.visualizer['save_dir'] = show_dir


def enable_tta(cfg: Config, library: str) -> None:
    """Wrap the model for test-time augmentation (mmdet adds a flip TTA when none is set)."""
    if library == 'mmseg':
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise NatMMError(
                '--tta needs tta_model and tta_pipeline in an mmseg config', cfg.filename
            )
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
        return
    if 'tta_model' not in cfg:
        warnings.warn('no tta_model in the config: using DetTTAModel with NMS 0.5', stacklevel=2)
        cfg.tta_model = dict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100),
        )
    if 'tta_pipeline' not in cfg:
        warnings.warn('no tta_pipeline in the config: using the test pipeline + flip', stacklevel=2)
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
        meta_keys = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                     'flip_direction')  # fmt: skip
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[
                [dict(type='RandomFlip', prob=1.0), dict(type='RandomFlip', prob=0.0)],
                [dict(type='PackDetInputs', meta_keys=meta_keys)],
            ],
        )
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def build_test_runner(
    config: str,
    checkpoint: str,
    work_dir: str | None = None,
    out: str | None = None,
    show: bool = False,
    show_dir: str | None = None,
    wait_time: float = 2.0,
    tta: bool = False,
    cfg_options: dict | None = None,
    launcher: str = 'none',
    trust: bool = False,
    force: bool = False,
    metrics_json: str | None = None,
    sha256: str | None = None,
):
    """The configured mmengine Runner for testing, after every input check.

    ``checkpoint`` may be a path or an ``http(s)://`` URL (downloaded once, see
    :func:`nat_mm.checkpoint.download_checkpoint`); it is read safely (``trust`` allows full
    unpickling) and loaded strictly when the test starts. ``out``: mmdet, a ``.pkl`` file of
    the predictions; mmseg, a folder of prediction PNGs. Other arguments as for
    :func:`build_train_runner` and mmdet's / mmseg's ``test.py``; ``metrics_json`` is only
    checked here (:func:`run_test` writes it); ``sha256`` is the checkpoint's expected hash.

    Raises:
        NatMMError: Any bad input, before the evaluation starts.
    """
    from nat_mm.checkpoint.reading import resolve_checkpoint_path

    cfg = load_config(config, cfg_options)
    library = library_of(cfg)
    register_library(library)
    if not checkpoint.startswith(('http://', 'https://')):
        # URLs are downloaded by the runner, once the process group exists (rank 0 first).
        checkpoint = resolve_checkpoint_path(checkpoint, sha256)
    if metrics_json is not None:
        check_can_write(metrics_json, force, '--metrics-json')
    check_backbone(cfg, pretrained=False)  # the checkpoint under test replaces the weights
    check_dataset_files(cfg, ('test_dataloader',))
    set_work_dir(cfg, work_dir, config)
    use_nat_mm_runtime(cfg, trust)
    cfg.load_from = checkpoint
    cfg.load_from_sha256 = sha256
    if out is not None:
        if library == 'mmdet':
            if not out.endswith(('.pkl', '.pickle')):
                raise NatMMError('must be a .pkl file for mmdet configs', f'--out {out}')
            check_can_write(out, force, '--out')
        elif os.path.exists(out) and not os.path.isdir(out):
            raise NatMMError('must be a folder for mmseg configs', f'--out {out}')
    if show_dir is not None and os.path.exists(show_dir) and not os.path.isdir(show_dir):
        raise NatMMError('is a file, expected a folder', f'--show-dir {show_dir}')
    if show or show_dir:
        enable_visualization(cfg, library, show, show_dir, wait_time)
    if tta:
        enable_tta(cfg, library)
    if out is not None and library == 'mmseg':
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True
    prepare_launcher(cfg, launcher)
    runner = _build_runner(cfg)
    if out is not None and library == 'mmdet':
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    return runner


def _json_value(value: object) -> float | str:
    """Numbers as floats (numpy scalars included), anything else (mmdet's copypaste) as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def run_test(runner, metrics_json: str | None = None) -> dict:
    """Runs the evaluation of a :func:`build_test_runner` runner; writes ``metrics_json``.

    Raises:
        NatMMError: The evaluation produced no metrics (an empty test set, for example).
    """
    import json

    from mmengine.dist import is_main_process

    from nat_mm.fileio import atomic_write_bytes

    metrics = runner.test()
    if not metrics:
        raise NatMMError(
            'the evaluation produced no metrics (is the test set empty?)', runner.cfg.filename
        )
    if metrics_json and is_main_process():
        values = {key: _json_value(value) for key, value in metrics.items()}
        atomic_write_bytes(json.dumps(values, indent=2).encode(), metrics_json)
    return metrics
