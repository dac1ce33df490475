"""The main job (``make demo``): generate the demo data, then for each head family the project
serves (Mask R-CNN + NAT, UPerNet + DiNAT, Mask2Former + NAT):

a. evaluate the model with fresh initial weights (the untrained baseline);
b. train it;
c. evaluate it again on the same validation images (mmdet's ``CocoMetric``, mmseg's
   ``IoUMetric`` with per-class figures, mmdet's ``CocoPanopticMetric``);
d. paint its predictions (one picture per image) and a grid of input | ground truth |
   prediction rows;

and print a summary table (also ``<work-dir>/summary.json``, with every figure).

Every training, evaluation and painting step runs nat_mm's command-line tool
(``python -m nat_mm.tools.<name>``) in a subprocess, so the job checks the tools too and each step
starts with fresh registries and memory. A step's full output goes to ``<work-dir>/logs/``; the
console shows one line per step and the tools' progress lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nat_mm.apis.config import build_model, load_config
from nat_mm.apis.datasets import generate_demo_data
from nat_mm.checkpoint import save_checkpoint_file
from nat_mm.data import ADE_SUBDIR, DemoDataSettings
from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes

# The demo configs ship in the repository's configs/demo folder.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'configs')
DET_CONFIG = os.path.join(CONFIG_DIR, 'demo', 'mask-rcnn_nat-demo_fpn_shapes-128.py')
SEG_CONFIG = os.path.join(CONFIG_DIR, 'demo', 'dinat-demo_upernet_shapes-128.py')
PAN_CONFIG = os.path.join(CONFIG_DIR, 'demo', 'mask2former_nat-demo_shapes-128-panoptic.py')
# mmengine validates after the last iteration whatever val_interval says; the job evaluates
# with the test tool right after training, so validation inside training is switched off.
NO_VALIDATION = ('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')
GRID_IMAGES = 4
# Console lines of a step: the tools' progress and results (the full output is in its log).
_PROGRESS = re.compile(r'(Iter\((?:train|test)\) \[\s*\d+/\d+\]|wrote \d+ pictures|^error: )')
_LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class MainJobSettings:
    """What the main job runs on.

    Attributes:
        work_dir: Output folder (checkpoints, metrics, pictures, logs, summary.json).
        data_root: Where the demo data is generated (reused when the settings match).
        num_train: Training images.
        num_val: Validation images.
        det_iters: Detector iterations, or None for the config's.
        seg_iters: Segmentor iterations, or None for the config's.
        pan_iters: Mask2Former iterations, or None for the config's.
        pictures: Validation images to paint per model (the grids show at most 4 of them).
        force: Run into a work dir that holds an earlier run, replacing its files.
    """

    work_dir: str = 'work_dirs/main_job'
    data_root: str = 'data/nat_mm_demo'
    num_train: int = DemoDataSettings.num_train
    num_val: int = DemoDataSettings.num_val
    det_iters: int | None = None
    seg_iters: int | None = None
    pan_iters: int | None = None
    pictures: int = 8
    force: bool = False


def det_overrides(data_root: str, iters: int | None) -> list[str]:
    """``--cfg-options`` pointing the detection config at ``data_root`` (and its length)."""
    coco = os.path.join(data_root, 'coco') + '/'
    options = [f'{loader}.dataset.data_root={coco}' for loader in _LOADERS] + [
        f'{evaluator}.ann_file={coco}annotations/instances_val2017.json'
        for evaluator in _EVALUATORS
    ]
    return options + _length_overrides(iters)


def seg_overrides(data_root: str, iters: int | None) -> list[str]:
    """``--cfg-options`` pointing the segmentation config at ``data_root`` (and its length)."""
    ade = os.path.join(data_root, ADE_SUBDIR)
    return [f'{loader}.dataset.data_root={ade}' for loader in _LOADERS] + _length_overrides(iters)


def pan_overrides(data_root: str, iters: int | None) -> list[str]:
    """``--cfg-options`` pointing the Mask2Former config at ``data_root`` (and its length)."""
    coco = os.path.join(data_root, 'coco') + '/'
    options = [f'{loader}.dataset.data_root={coco}' for loader in _LOADERS]
    for evaluator in _EVALUATORS:
        options += [
            f'{evaluator}.ann_file={coco}annotations/panoptic_val2017.json',
            f'{evaluator}.seg_prefix={coco}annotations/panoptic_val2017/',
        ]
    return options + _length_overrides(iters)


_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
_EVALUATORS = ('val_evaluator', 'test_evaluator')


def _length_overrides(iters: int | None) -> list[str]:
    if iters is None:
        return []
    # Scheduler phases are clipped to the run; a checkpoint at the end (and halfway) is kept.
    warmup = min(50, max(1, iters // 4))
    return [
        f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={iters}',
        f'default_hooks.checkpoint.interval={max(1, iters // 2)}',
        f'param_scheduler.0.end={warmup}',
        f'param_scheduler.1.begin={warmup}',
        f'param_scheduler.1.end={iters}',
    ]


@dataclass(frozen=True)
class Family:
    """One head family of the job: its config, data and the figures its summary shows.

    Attributes:
        name: Folder and summary key ('detector', 'segmentor', 'panoptic').
        title: The model, as the summary names it.
        config: The demo config.
        overrides: ``(data_root, iters) -> --cfg-options``.
        grid: :mod:`nat_mm.apis.grids` family ('instances', 'semantic', 'panoptic').
        metrics: (metrics.json key, label) of the figures compared untrained -> trained.
        digits: Decimals the summary shows (mAP is a fraction, mIoU and PQ are percentages).
    """

    name: str
    title: str
    config: str
    overrides: Callable[[str, int | None], list[str]]
    grid: str
    metrics: tuple[tuple[str, str], ...]
    digits: int = 2


FAMILIES = (
    Family(
        'detector', 'Mask R-CNN + NAT (embed 32, depths 1-1-2-1, k7)', DET_CONFIG, det_overrides,
        'instances',
        (('coco/bbox_mAP', 'bbox mAP'), ('coco/bbox_mAP_50', 'bbox mAP50'),
         ('coco/segm_mAP', 'segm mAP'), ('coco/segm_mAP_50', 'segm mAP50')),
        digits=3,
    ),
    Family(
        'segmentor', 'UPerNet + DiNAT (embed 32, depths 2-2-2-1, k7, dilation <= 4)', SEG_CONFIG,
        seg_overrides, 'semantic',
        (('mIoU', 'mIoU'), ('mAcc', 'mAcc'), ('aAcc', 'aAcc')),
    ),
    Family(
        'panoptic', 'Mask2Former + NAT (embed 32, depths 1-1-2-1, k7; 64-d head)', PAN_CONFIG,
        pan_overrides, 'panoptic',
        (('coco_panoptic/PQ', 'PQ'), ('coco_panoptic/SQ', 'SQ'), ('coco_panoptic/RQ', 'RQ'),
         ('coco_panoptic/PQ_th', 'PQ things'), ('coco_panoptic/PQ_st', 'PQ stuff')),
    ),
)  # fmt: skip


class StepRunner:
    """Runs the job's steps as tool subprocesses: numbered progress on the console, each step's
    full output in ``<log_dir>/<NN>-<name>.log``, wall times kept by name."""

    def __init__(self, log_dir: str, total_steps: int) -> None:
        self.log_dir = log_dir
        self.total_steps = total_steps
        self.number = 0
        self.times: dict[str, float] = {}
        self.logs: dict[str, str] = {}
        os.makedirs(log_dir, exist_ok=True)

    def announce(self, title: str) -> None:
        self.number += 1
        print(f'[{self.number}/{self.total_steps}] {title}', flush=True)

    def tool(self, key: str, title: str, tool: str, arguments: list[str]) -> None:
        """Runs ``python -m nat_mm.tools.<tool> ARGUMENTS`` as the next step.

        Raises:
            NatMMError: The step exited with a non-zero status (the log's tail is printed).
        """
        self.announce(title)
        log = os.path.join(self.log_dir, f'{self.number:02d}-{key}.log')
        command = [sys.executable, '-m', f'nat_mm.tools.{tool}', *arguments]
        start = time.perf_counter()
        with open(log, 'w') as log_file:
            log_file.write('$ ' + ' '.join(command) + '\n')
            log_file.flush()
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=dict(os.environ, PYTHONUNBUFFERED='1'),
            )  # fmt: skip
            try:
                for line in process.stdout:  # text mode: progress bars' '\r' become lines
                    log_file.write(line)
                    match = _PROGRESS.search(line)
                    if match:
                        print('      ' + _progress_line(line, match.start()), flush=True)
            except BaseException:  # Ctrl-C, SIGTERM: the step ends with the job
                process.kill()
                raise
            finally:
                process.stdout.close()
                status = process.wait()
        self.times[key] = time.perf_counter() - start
        self.logs[key] = log
        if status != 0:
            with open(log) as f:
                print(''.join(f.readlines()[-_LOG_TAIL_LINES:]), file=sys.stderr, flush=True)
            raise NatMMError(f'step "{title}" failed with exit status {status}', log)

    def timed(self, key: str, work: Callable, *arguments, quiet: bool = True) -> object:
        """Runs ``work(*arguments)`` in this process, keeping its wall time under ``key``;
        ``quiet``: what it prints goes to ``<log_dir>/<NN>-<key>.log``."""
        start = time.perf_counter()
        if quiet:
            log = os.path.join(self.log_dir, f'{self.number:02d}-{key}.log')
            with open(log, 'a') as log_file, contextlib.redirect_stdout(log_file):
                result = work(*arguments)
            self.logs[key] = log
        else:
            result = work(*arguments)
        self.times[key] = time.perf_counter() - start
        return result


def _progress_line(line: str, start: int) -> str:
    """A tool's progress line, short: position, eta and loss (the log keeps the rest)."""
    text = line[start:].strip()
    if not text.startswith('Iter('):
        return text
    head = text[: text.index(']') + 1]
    fields = [f'{name} {value}' for name, value in re.findall(r'\b(eta|loss): (\S+)', text)]
    return '  '.join([head, *fields])


def save_untrained_checkpoint(config: str, overrides: list[str], path: str) -> None:
    """Builds the config's model with fresh initial weights and saves it as a checkpoint."""
    import torch

    cfg = load_config(config, _parse_overrides(overrides))
    torch.manual_seed(cfg.get('randomness', {}).get('seed', 0))
    model = build_model(cfg)
    model.init_weights()
    # Class names in the meta, as the Runner saves them, so that the pictures are labelled.
    meta = {'dataset_meta': dict(cfg.train_dataloader.dataset.metainfo)}
    save_checkpoint_file({'state_dict': model.state_dict(), 'meta': meta}, path)


def _parse_overrides(overrides: list[str]) -> dict:
    """``key=value`` strings -> the dict ``--cfg-options`` would give."""
    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *overrides]).cfg_options


def _final_checkpoint(work_dir: str) -> str:
    """The checkpoint the last training run in ``work_dir`` pointed at."""
    with open(os.path.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _val_images(family: Family, data_root: str) -> str:
    if family.grid == 'semantic':
        return os.path.join(data_root, ADE_SUBDIR, 'images', 'validation')
    return os.path.join(data_root, 'coco', 'val2017')


def paint_family_grid(
    family: Family, checkpoint: str, data_root: str, out_file: str, count: int, force: bool
) -> str:
    """The grid of the first ``count`` validation images (:mod:`nat_mm.apis.grids`)."""
    from nat_mm.apis import grids
    from nat_mm.apis.inference import init_inferencer, list_images

    options = _parse_overrides(family.overrides(data_root, None))
    inferencer = init_inferencer(family.config, checkpoint, 'cpu', options)
    images = list_images(_val_images(family, data_root), count)
    meta = inferencer.model.dataset_meta
    names = [os.path.basename(path) for path in images]
    annotations = os.path.join(data_root, 'coco', 'annotations')
    if family.grid == 'instances':
        truth = grids.instance_ground_truth(
            os.path.join(annotations, 'instances_val2017.json'), list(meta['classes'])
        )
        ground_truth = [truth[name] for name in names]
    elif family.grid == 'panoptic':
        truth = grids.panoptic_ground_truth(
            os.path.join(annotations, 'panoptic_val2017.json'), list(meta['classes']),
            meta['thing_classes'],
        )  # fmt: skip
        ground_truth = [truth[name] for name in names]
    else:
        labels = os.path.join(data_root, ADE_SUBDIR, 'annotations', 'validation')
        ground_truth = [
            grids.semantic_ground_truth(
                os.path.join(labels, os.path.splitext(name)[0] + '.png'), len(meta['classes'])
            )
            for name in names
        ]
    title = f'{family.title}: input | ground truth | prediction (x{grids.SCALE})'
    return grids.paint_grid(
        family.grid, inferencer, images, ground_truth, out_file, title, force=force
    )


def summarize(results: dict) -> str:
    """The summary table printed at the end of the job."""
    rule = '=' * 78
    data = results['data']
    lines = [
        '', rule, 'nat_mm main job: summary', rule,
        f'data: {data["train_images"]} train / {data["val_images"]} val images in {data["root"]}',
        '',
        f'{"model / metric":<52}{"untrained":>12}{"trained":>12}',
    ]  # fmt: skip
    for family in FAMILIES:
        result = results[family.name]
        lines.append(f'{family.title}, {result["iterations"]} iterations')
        for key, label in family.metrics:
            before, after = result['untrained'].get(key), result['trained'].get(key)
            before, after = (_figure(v, family.digits) for v in (before, after))
            lines.append(f'  {label:<50}{before:>12}{after:>12}')
        if family.name == 'segmentor':
            for state in ('untrained', 'trained'):
                per_class = [
                    f'{key[4:]} {value:.1f}'
                    for key, value in result[state].items()
                    if key.startswith('IoU.')
                ]
                lines.append(f'  IoU per class, {state}: ' + ', '.join(per_class))
    lines += ['', 'grids (input | ground truth | prediction):']
    lines += [f'  {results[f.name]["grid"]}' for f in FAMILIES]
    lines += ['pictures (one per image):']
    lines += [f'  {results[f.name]["pictures"]}' for f in FAMILIES]
    lines += [
        f'logs of every step: {results["log_dir"]}',
        'step times (s): '
        + ', '.join(f'{name} {seconds:.0f}' for name, seconds in results['times'].items()),
        f'total wall time: {results["total_seconds"] / 60:.1f} min; every figure in '
        f'{os.path.join(results["work_dir"], "summary.json")}',
        rule,
    ]
    return '\n'.join(lines)


def _figure(value: float | None, digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _check_work_dir(work_dir: str, force: bool) -> None:
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise NatMMError('the work dir is a file, expected a folder', work_dir)
    if os.path.isdir(work_dir) and os.listdir(work_dir) and not force:
        raise NatMMError(
            'the work dir holds an earlier run; pass --force to replace its files '
            '(make demo DEMO_ARGS=--force), or choose another --work-dir',
            work_dir,
        )


def _iterations(settings: MainJobSettings, family: Family) -> int:
    iters = {'detector': settings.det_iters, 'segmentor': settings.seg_iters,
             'panoptic': settings.pan_iters}[family.name]  # fmt: skip
    return iters or load_config(family.config).train_cfg.max_iters


@contextlib.contextmanager
def _library_output_to(log_file: str) -> Iterator[None]:
    """The host libraries' log records and Python warnings of this process (building the
    untrained models, painting the grids) go to ``log_file`` instead of the console; errors
    still reach the console."""
    import logging

    from mmengine.logging import MMLogger

    # The newest MMLogger is the one mmengine's print_log(logger='current') writes to.
    logger = MMLogger.get_instance(f'nat_mm_main_job_{os.getpid()}', log_file=log_file)
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        logger.warning(warnings.formatwarning(message, category, filename, lineno, line).strip())

    with warnings.catch_warnings():
        warnings.showwarning = log_warning
        yield


def _run_family(
    family: Family, settings: MainJobSettings, data_root: str, work_dir: str, steps: StepRunner
) -> dict:
    """Steps a-d of one family (module docstring); returns its part of the summary."""
    iters = _iterations(settings, family)
    options = family.overrides(data_root, iters)
    folder = os.path.join(work_dir, family.name)
    force = ['--force'] if settings.force else []
    metrics = {}

    def evaluate(state: str, checkpoint: str) -> None:
        metrics_json = os.path.join(folder, f'metrics_{state}.json')
        steps.tool(f'{family.name}_eval_{state}', f'evaluate the {state} {family.name}', 'test', [
            family.config, checkpoint, '--work-dir', os.path.join(folder, f'test_{state}'),
            '--metrics-json', metrics_json, *force, '--cfg-options', *options,
        ])  # fmt: skip
        metrics[state] = _read_json(metrics_json)

    untrained = os.path.join(work_dir, 'untrained', f'{family.name}.pth')
    steps.timed(f'{family.name}_init', save_untrained_checkpoint, family.config, options, untrained)
    evaluate('untrained', untrained)
    steps.tool(f'{family.name}_train', f'train the {family.name}', 'train', [
        family.config, '--work-dir', folder, *force, '--cfg-options', *options, *NO_VALIDATION,
    ])  # fmt: skip
    trained = _final_checkpoint(folder)
    evaluate('trained', trained)
    pictures = os.path.join(work_dir, 'pictures', family.name)
    steps.tool(f'{family.name}_pictures', f'paint {family.name} predictions', 'demo', [
        family.config, trained, _val_images(family, data_root), '--out-dir', pictures,
        '--limit', str(settings.pictures), *force, '--cfg-options', *options,
    ])  # fmt: skip
    grid = os.path.join(work_dir, 'pictures', f'{family.name}_grid.png')
    steps.announce(f'paint the {family.name} grid')
    count = min(GRID_IMAGES, settings.pictures)
    steps.timed(f'{family.name}_grid', paint_family_grid, family, trained, data_root, grid, count,
                settings.force)  # fmt: skip
    print(f'      wrote {grid}', flush=True)
    return {
        'model': family.title,
        'config': family.config,
        'iterations': iters,
        'untrained': metrics['untrained'],
        'trained': metrics['trained'],
        'checkpoint': trained,
        'pictures': pictures,
        'grid': grid,
    }


def run_main_job(settings: MainJobSettings) -> dict:
    """Runs the whole job; returns the summary it also writes to ``summary.json``.

    Raises:
        NatMMError: A bad setting, a work dir with an earlier run (without ``force``), or a
            step that failed.
    """
    for family in FAMILIES:
        if not os.path.isfile(family.config):
            raise NatMMError('the demo configs ship with the repository: run from a clone',
                             family.config)  # fmt: skip
    work_dir, data_root = os.path.abspath(settings.work_dir), os.path.abspath(settings.data_root)
    _check_work_dir(work_dir, settings.force)
    if settings.pictures < 1:
        raise NatMMError(f'expected at least 1 picture, got {settings.pictures}', '--pictures')
    try:
        data_settings = DemoDataSettings(num_train=settings.num_train, num_val=settings.num_val)
    except ValueError as error:
        raise NatMMError(str(error), '--num-train / --num-val') from error
    # SIGTERM becomes SystemExit, so that the running step is killed instead of orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.perf_counter()
    steps = StepRunner(os.path.join(work_dir, 'logs'), total_steps=1 + 5 * len(FAMILIES))

    results: dict = {
        'work_dir': work_dir,
        'data': {'root': data_root, 'train_images': settings.num_train,
                 'val_images': settings.num_val},
    }  # fmt: skip
    with _library_output_to(os.path.join(steps.log_dir, 'main_job.log')):
        steps.announce('generate the demo data')
        steps.timed('data', generate_demo_data, data_root, data_settings, quiet=False)
        for family in FAMILIES:
            results[family.name] = _run_family(family, settings, data_root, work_dir, steps)
    results.update(log_dir=steps.log_dir, logs=steps.logs, times=steps.times,
                   total_seconds=time.perf_counter() - start)  # fmt: skip
    atomic_write_bytes(
        json.dumps(results, indent=2).encode(), os.path.join(work_dir, 'summary.json')
    )
    print(summarize(results), flush=True)
    return results
