"""Speed and peak memory of a NAT / DiNAT model next to its Swin-T peer, measured the same way.

Subjects and their peers:

- ``--backbone nat-tiny`` (any NAT / DiNAT preset): the bare backbone vs mmdet's SwinTransformer-T
  (embed 96, depths 2-2-6-2, window 7).
- a detection config: the full model vs Mask R-CNN Swin-T
  (``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``).
- a segmentation config: the full model vs UPerNet Swin-T
  (``mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py``).

Two measurements per model: inference (``no_grad`` forward; for configs ``model.test_step``) and a
training step (forward, loss, backward, AdamW step; for configs ``model.train_step`` on synthetic
boxes / masks / label maps). Each measurement runs in a fresh subprocess so that memory peaks do
not mix. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the
process's peak resident set (``getrusage`` ``ru_maxrss``) over its resident set just before the
model is built, i.e. weights + activations + allocator overhead, as the OS saw it.

    python tools/benchmark.py --backbone nat-tiny --shape 800 1216
    python tools/benchmark.py configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_1x_coco.py --shape 800 1216
        [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--batch 1] [--warmup 1] [--iters 3]
        [--modes infer train] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from nat_mm.tools_common import ToolError, run_tool

PEER_CONFIGS = {
    'mmdet': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    'mmseg': 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
}
SWIN_TINY = dict(
    embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4,
    drop_path_rate=0.0, out_indices=(0, 1, 2, 3),
)  # fmt: skip
DTYPES = ('fp32', 'bf16', 'fp16')
MODES = ('infer', 'train')
RESULT_MARK = 'BENCHMARK_RESULT '


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark a NAT/DiNAT model against Swin-T')
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config (or use --backbone)')
    parser.add_argument('--backbone', help="bare backbone preset, e.g. 'nat-tiny', 'dinat-small'")
    parser.add_argument('--shape', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', choices=DTYPES, default='fp32')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument(
        '--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train']
    )
    parser.add_argument(
        '--attn-backend', help="NAT/DiNAT na2d backend ('torch', 'flex', 'natten'); default auto"
    )
    parser.add_argument('--threads', type=int, help='torch intra-op threads (default: torch)')
    parser.add_argument('--no-peer', action='store_true', help='measure the subject only')
    parser.add_argument('--profile', action='store_true', help='print where the time goes')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker and (args.config is None) == (args.backbone is None):
        parser.error('give either a config or --backbone')
    return args


# ----------------------------------------------------------------------------- building models


def _build_backbone(name: str, attn_backend: str | None):
    """A NAT/DiNAT preset ('nat-tiny') or 'swin-tiny' (mmdet's, else mmseg's SwinTransformer)."""
    if name == 'swin-tiny':
        try:
            from mmdet.models.backbones import SwinTransformer
        except ImportError:
            from mmseg.models.backbones import SwinTransformer
        return SwinTransformer(**SWIN_TINY)
    family, _, arch = name.partition('-')
    from nat_mm.models import NAT, DiNAT

    classes = {'nat': NAT, 'dinat': DiNAT}
    if family not in classes or not arch:
        raise ToolError(f"--backbone must look like 'nat-tiny' or 'dinat-small', got {name!r}")
    try:
        return classes[family](arch=arch, drop_path_rate=0.0, attn_backend=attn_backend)
    except ValueError as error:
        raise ToolError(f'--backbone {name!r}: {error}') from error


def _build_from_config(config: str, attn_backend: str | None):
    """The config's model (backbone weights not loaded, SyncBN reverted) and its library."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, DefaultScope

    from nat_mm.tools_common import library_of, load_config, register_library

    cfg = load_config(config)
    library = library_of(cfg)
    register_library(library)
    cfg.model.backbone.init_cfg = None
    if attn_backend and cfg.model.backbone.type in ('NAT', 'DiNAT'):
        cfg.model.backbone.attn_backend = attn_backend
    with DefaultScope.overwrite_default_scope(library):
        model = MODELS.build(cfg.model)
    return revert_sync_batchnorm(model), library


def _synthetic_batch(library: str, batch: int, height: int, width: int) -> dict:
    """A packed batch (``inputs`` + ``data_samples``) with random images and annotations."""
    import torch

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


def _step_function(spec: dict, device, train: bool):
    """Build the model of ``spec``; return it and a function doing one inference or train step."""
    import torch

    height, width = spec['shape']
    if spec['kind'] == 'backbone':
        model = _build_backbone(spec['model'], spec['attn_backend']).to(device)
        images = torch.randn(spec['batch'], 3, height, width, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def backbone_train_step():
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


def measure(spec: dict) -> dict:
    """Build one model and time one mode; runs inside a fresh worker process."""
    import torch

    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[spec['dtype']]
    train = spec['mode'] == 'train'
    baseline = _current_rss_mib()
    model, step = _step_function(spec, device, train)
    model.train(train)

    def run_once():
        with (
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
            torch.set_grad_enabled(train),
        ):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize()

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
    """Run :func:`measure` in a fresh interpreter and return its result."""
    command = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise ToolError(
        f'measurement {spec["model"]} / {spec["mode"]} failed (exit {completed.returncode}):\n'
        + completed.stderr[-3000:]
    )


# ----------------------------------------------------------------------------- the table


def _peer_of(args: argparse.Namespace) -> tuple[str, str]:
    if args.backbone:
        return 'swin-tiny', 'Swin-T backbone (mmdet)'
    from nat_mm.tools_common import library_of, load_config

    library = library_of(load_config(args.config))
    return PEER_CONFIGS[library], {'mmdet': 'Mask R-CNN Swin-T', 'mmseg': 'UPerNet Swin-T'}[library]


def format_table(rows: list[dict], ratios: list[str]) -> str:
    header = f'{"mode":<7} {"model":<52} {"img/s":>8} {"s/iter":>8} {"peak MiB":>9} {"params M":>9}'
    lines = [header, '-' * len(header)]
    for row in rows:
        lines.append(
            f'{row["mode"]:<7} {row["label"][:52]:<52} {row["images_per_second"]:>8.3f} '
            f'{row["seconds"]:>8.3f} {row["peak_memory_mib"]:>9.0f} {row["params_m"]:>9.2f}'
        )
    return '\n'.join(lines + ratios)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(measure(json.loads(args.worker))), flush=True)
        return []
    if args.config and not os.path.isfile(args.config):
        raise ToolError(f'config file {args.config!r} does not exist')
    if args.device.startswith('cuda'):
        import torch

        if not torch.cuda.is_available():
            raise ToolError(f'--device {args.device}: no CUDA device is available')
    kind = 'backbone' if args.backbone else 'config'
    subject = args.backbone or args.config
    models = [(subject, f'{subject} backbone (nat_mm)' if args.backbone else subject)]
    if not args.no_peer:
        models.append(_peer_of(args))
    memory_method = 'peak RSS growth (getrusage ru_maxrss), fresh process per row'
    if args.device.startswith('cuda'):
        memory_method = 'torch.cuda.max_memory_allocated'
    print(f'shape {args.shape[0]}x{args.shape[1]}, batch {args.batch}, {args.dtype}, '
          f'{args.device}, threads {args.threads or "torch default"}; memory: {memory_method}',
          flush=True)  # fmt: skip
    rows = []
    for mode in args.modes:
        for model, label in models:
            spec = dict(
                kind=kind, model=model, mode=mode, shape=list(args.shape), batch=args.batch,
                device=args.device, dtype=args.dtype, warmup=args.warmup, iters=args.iters,
                threads=args.threads, attn_backend=args.attn_backend,
                profile=args.profile and model == subject,
            )  # fmt: skip
            result = run_worker(spec)
            rows.append(dict(result, mode=mode, label=label))
            print(f'  measured {mode:<5} {label}: {result["seconds"]:.3f} s/iter', flush=True)
            if 'profile' in result:
                print(result['profile'], flush=True)
    ratios = []
    if not args.no_peer:
        for mode in args.modes:
            subject_row, peer_row = (row for row in rows if row['mode'] == mode)
            time_ratio = subject_row['seconds'] / peer_row['seconds']
            memory_ratio = subject_row['peak_memory_mib'] / peer_row['peak_memory_mib']
            ratios.append(
                f'{mode}: subject/peer time ratio {time_ratio:.2f}, '
                f'peak memory ratio {memory_ratio:.2f}'
            )
    print(format_table(rows, ratios), flush=True)
    return rows


if __name__ == '__main__':
    run_tool(main)
