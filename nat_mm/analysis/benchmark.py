"""Speed and peak memory of a NAT / DiNAT model next to its Swin-T peer, measured the same way.

Subjects and their peers:

- a bare backbone preset (``nat-tiny``, any NAT / DiNAT preset): vs Swin-T (embed 96, depths
  2-2-6-2, window 7): mmdet's SwinTransformer, else mmseg's, else timm's
  ``swin_tiny_patch4_window7_224`` (features only, built for the input size), whichever is
  installed first (the GPU machine has only timm);
- a detection config: the full model vs Mask R-CNN Swin-T
  (``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``);
- a segmentation config: the full model vs UPerNet Swin-T
  (``mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py``).

Two measurements per model: inference (``no_grad`` forward; for configs ``model.test_step``) and a
training step (forward, loss, backward, AdamW step; for configs ``model.train_step`` on synthetic
boxes / masks / label maps), in float32 or under ``torch.autocast`` in bfloat16 / float16. Each
measurement runs in a fresh subprocess so that memory peaks do not mix. Peak memory: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak resident set
(``getrusage`` ``ru_maxrss``) over its resident set just before the model is built.

The same run measures the machine's matrix-multiply rate in the benchmark's dtype, and each bare
backbone's achieved rate (its fvcore FLOPs x 2 per multiply-add / time; a training step counted
as 3 forwards) as a fraction of it.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes, check_can_write

PEER_CONFIGS = {
    'mmdet': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    'mmseg': 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
}
PEER_LABELS = {'mmdet': 'Mask R-CNN Swin-T', 'mmseg': 'UPerNet Swin-T'}
SWIN_TINY = dict(
    embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4,
    drop_path_rate=0.0, out_indices=(0, 1, 2, 3),
)  # fmt: skip
DTYPES = ('float32', 'bfloat16', 'float16')
MODES = ('infer', 'train')
RESULT_MARK = 'BENCHMARK_RESULT '


# ----------------------------------------------------------------------------- building models


def swin_library() -> str:
    """The first of mmdet, mmseg, timm whose Swin-T imports (the peer backbone's origin)."""
    for library in ('mmdet', 'mmseg', 'timm'):
        module = 'timm' if library == 'timm' else f'{library}.models.backbones'
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return library
    raise NatMMError('Swin-T needs mmdet, mmseg or timm installed', 'swin-tiny')


def swin_tiny(shape: tuple[int, int]) -> torch.nn.Module:
    """Swin-T (embed 96, depths 2-2-6-2, window 7) from :func:`swin_library`."""
    library = swin_library()
    if library == 'timm':
        import timm

        return timm.create_model(
            'swin_tiny_patch4_window7_224', pretrained=False, features_only=True, img_size=shape
        )
    module = importlib.import_module(f'{library}.models.backbones')
    return module.SwinTransformer(**SWIN_TINY)


def _build_backbone(name: str, attn_backend: str | None, shape: tuple[int, int]) -> torch.nn.Module:
    """A NAT/DiNAT preset ('nat-tiny') or 'swin-tiny' (:func:`swin_tiny`)."""
    if name == 'swin-tiny':
        return swin_tiny(tuple(shape))
    from nat_mm.apis.config import build_backbone

    return build_backbone(name, attn_backend=attn_backend)


def _build_from_config(config: str, attn_backend: str | None) -> tuple[torch.nn.Module, str]:
    """The config's model (backbone weights not loaded, SyncBN reverted) and its library."""
    from nat_mm.apis.config import build_model, library_of, load_config

    cfg = load_config(config)
    cfg.model.backbone.init_cfg = None
    if attn_backend and cfg.model.backbone.type in ('NAT', 'DiNAT'):
        cfg.model.backbone.attn_backend = attn_backend
    return build_model(cfg), library_of(cfg)


def _synthetic_batch(library: str, batch: int, height: int, width: int) -> dict:
    """A packed batch (``inputs`` + ``data_samples``) with random images and annotations."""
    if library == 'mmdet':
        from mmdet.testing import demo_mm_inputs

        return demo_mm_inputs(
            batch, [(3, height, width)] * batch, num_items=[5] * batch, num_classes=80,
            with_mask=True, use_box_type=True,
        )  # fmt: skip
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(batch):
        sample = SegDataSample()
        sample.set_metainfo(dict(img_shape=(height, width), ori_shape=(height, width),
                                 pad_shape=(height, width)))  # fmt: skip
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, height, width)))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8) for _ in range(batch)]
    return dict(inputs=inputs, data_samples=samples)


# ----------------------------------------------------------------------------- one measurement


def _current_rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _step_function(spec: dict, device: torch.device, train: bool):
    """Builds the model of ``spec``; returns it and a function doing one step."""
    height, width = spec['shape']
    if spec['kind'] == 'backbone':
        model = _build_backbone(spec['model'], spec['attn_backend'], spec['shape']).to(device)
        images = torch.randn(spec['batch'], 3, height, width, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def backbone_train_step() -> None:
            loss = sum(feature.float().mean() for feature in model(images))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, backbone_train_step if train else (lambda: model(images))
    from mmengine.optim import OptimWrapper

    model, library = _build_from_config(spec['model'], spec['attn_backend'])
    model = model.to(device)
    data = _synthetic_batch(library, spec['batch'], height, width)
    optim_wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    if train:
        return model, lambda: model.train_step(data, optim_wrapper)
    return model, lambda: model.test_step(data)


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measure(spec: dict) -> dict:
    """Builds one model and times one mode; runs inside a fresh worker process."""
    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    dtype = getattr(torch, spec['dtype'])
    train = spec['mode'] == 'train'
    baseline = _current_rss_mib()
    model, step = _step_function(spec, device, train)
    model.train(train)

    def run_once() -> None:
        with (
            torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            torch.set_grad_enabled(train),
        ):
            step()
        _synchronize(device)

    for _ in range(spec['warmup']):
        run_once()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec['iters']):
        start = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mib() - baseline
    median = sorted(times)[len(times) // 2]
    result = {
        'seconds': median,
        'images_per_second': spec['batch'] / median,
        'peak_memory_mib': peak,
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if spec['profile']:
        from torch.profiler import profile

        with profile() as prof:
            run_once()
        result['profile'] = prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=20)
    return result


def run_worker(spec: dict) -> dict:
    """Runs :func:`measure` in a fresh interpreter and returns its result."""
    command = [sys.executable, '-m', 'nat_mm.analysis.benchmark', json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise NatMMError(
        f'the measurement failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}',
        f'{spec["model"]} / {spec["mode"]}',
    )


def gemm_gflops(dtype: torch.dtype, device: str, threads: int | None, size: int = 2048) -> float:
    """The machine's matrix-multiply rate (GFLOP/s, 2 per multiply-add) in ``dtype``."""
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < 1.0:
        torch.matmul(a, b)
        repeats += 1
    _synchronize(torch.device(device))
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------- the comparison


def benchmark(
    config: str | None = None,
    backbone: str | None = None,
    shape: tuple[int, int] = (800, 1216),
    batch: int = 1,
    device: str = 'cpu',
    dtype: str = 'float32',
    warmup: int = 1,
    iters: int = 3,
    modes: tuple[str, ...] = MODES,
    attn_backend: str | None = None,
    threads: int | None = None,
    peer: bool = True,
    profile: bool = False,
    json_path: str | None = None,
) -> list[dict]:
    """Measures the subject (and its Swin-T peer); prints a table with ratios and returns the rows
    (also written to ``json_path`` with the settings and the machine's GEMM rate, when given).

    Raises:
        NatMMError: Bad arguments (checked before anything runs) or a failed measurement.
    """
    if (config is None) == (backbone is None):
        raise NatMMError('give either a config or a backbone', 'config / --backbone')
    if config is not None and not os.path.isfile(config):
        raise NatMMError('config file does not exist', config)
    if backbone is not None:
        from nat_mm.apis.config import backbone_presets

        if backbone not in backbone_presets():
            raise NatMMError(f'unknown backbone; expected one of {backbone_presets()}', backbone)
    if dtype not in DTYPES:
        raise NatMMError(f'expected one of {DTYPES}, got {dtype!r}', '--dtype')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise NatMMError('no CUDA device is available', f'--device {device}')
    if json_path is not None:
        check_can_write(json_path, True, '--json')
    kind = 'backbone' if backbone else 'config'
    subject = backbone or config
    models = [(subject, f'{subject} backbone (nat_mm)' if backbone else subject)]
    if peer:
        if backbone:
            models.append(('swin-tiny', f'Swin-T backbone ({swin_library()})'))
        else:
            from nat_mm.apis.config import library_of, load_config

            library = library_of(load_config(config))
            models.append((PEER_CONFIGS[library], PEER_LABELS[library]))
    rate = gemm_gflops(getattr(torch, dtype), device, threads)
    memory_method = (
        'torch.cuda.max_memory_allocated' if device.startswith('cuda')
        else 'peak RSS growth (getrusage ru_maxrss), fresh process per row'
    )  # fmt: skip
    print(f'shape {shape[0]}x{shape[1]}, batch {batch}, {dtype}, {device}, threads '
          f'{threads or "torch default"}; memory: {memory_method}; machine GEMM rate in '
          f'{dtype}: {rate:.0f} GFLOP/s', flush=True)  # fmt: skip
    rows = []
    for mode in modes:
        for model, label in models:
            spec = dict(
                kind=kind, model=model, mode=mode, shape=list(shape), batch=batch,
                device=device, dtype=dtype, warmup=warmup, iters=iters, threads=threads,
                attn_backend=attn_backend, profile=profile and model == subject,
            )  # fmt: skip
            result = run_worker(spec)
            rows.append(dict(result, mode=mode, label=label, model=model))
            print(f'  measured {mode:<5} {label}: {result["seconds"]:.3f} s/iter', flush=True)
            if 'profile' in result:
                print(result['profile'], flush=True)
    if kind == 'backbone':
        _add_achieved_rates(rows, shape, batch, rate)
    print(format_table(rows, _ratios(rows, modes) if peer else []), flush=True)
    if json_path is not None:
        settings = dict(subject=subject, shape=list(shape), batch=batch, device=device, dtype=dtype,
                        threads=threads, iters=iters, gemm_gflops=rate)  # fmt: skip
        rows_out = [{k: v for k, v in row.items() if k != 'profile'} for row in rows]
        atomic_write_bytes(
            json.dumps({'settings': settings, 'rows': rows_out}, indent=2).encode(), json_path
        )
    return rows


def _add_achieved_rates(rows: list[dict], shape: tuple[int, int], batch: int, rate: float) -> None:
    """Adds 'gflops_per_second' and 'of_gemm_rate' to backbone rows (3 forwards per train step)."""
    from mmengine.analysis import FlopAnalyzer

    for row in rows:
        model = _build_backbone(row['model'], None, shape)
        model.eval()  # mmdet's SwinTransformer.train() returns None: no chaining
        with torch.no_grad():
            analyzer = FlopAnalyzer(model, (torch.rand(1, 3, *shape),))
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            macs = analyzer.total() * batch
        flops = 2 * macs * (3 if row['mode'] == 'train' else 1)
        row['gflops_per_second'] = flops / row['seconds'] / 1e9
        row['of_gemm_rate'] = row['gflops_per_second'] / rate


def _ratios(rows: list[dict], modes: tuple[str, ...]) -> list[str]:
    lines = []
    for mode in modes:
        subject, peer = (row for row in rows if row['mode'] == mode)
        lines.append(
            f'{mode}: subject/peer time ratio {subject["seconds"] / peer["seconds"]:.2f}, '
            f'peak memory ratio {subject["peak_memory_mib"] / peer["peak_memory_mib"]:.2f}'
        )
    return lines


def format_table(rows: list[dict], ratios: list[str]) -> str:
    header = (f'{"mode":<7} {"model":<52} {"img/s":>8} {"s/iter":>8} {"peak MiB":>9} '
              f'{"params M":>9} {"GFLOP/s":>8} {"of GEMM":>8}')  # fmt: skip
    lines = [header, '-' * len(header)]
    for row in rows:
        achieved = (f'{row["gflops_per_second"]:>8.0f} {row["of_gemm_rate"]:>8.0%}'
                    if 'gflops_per_second' in row else f'{"-":>8} {"-":>8}')  # fmt: skip
        lines.append(
            f'{row["mode"]:<7} {row["label"][:52]:<52} {row["images_per_second"]:>8.3f} '
            f'{row["seconds"]:>8.3f} {row["peak_memory_mib"]:>9.0f} {row["params_m"]:>9.2f} '
            f'{achieved}'
        )
    return '\n'.join(lines + ratios)


if __name__ == '__main__':  # the worker of run_worker
    print(RESULT_MARK + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
