"""Benchmark of the na2d backends against the gather oracle and Swin-style window attention.

Shapes: the NAT-Tiny layers at a COCO-sized input (800 x 1216 image -> stage 1 is 200 x 304
tokens), kernel 7, head_dim 32, with RPB, plus DiNAT's detection dilations. Every method sees the
same q, k, v (and an RPB table) and is timed in the same run:

- each available na2d backend (`nat_mm.ops.available_backends()`);
- `oracle`: the gather reference of nat_mm.ops.reference (K*K copies of k and v);
- `window`: Swin-style window attention on the same tokens (window 7, maps padded to multiples of
  7, batched `scaled_dot_product_attention` with the gathered relative-position bias as its mask),
  the speed/memory target.

Time: median of `--repeats` runs of the forward, and of forward + backward (gradients to q, k, v
and the bias table), in this process. Memory, CPU: peak resident memory during one forward +
backward above the resident memory just before it (inputs included in neither), read from
/proc/self/status VmHWM after resetting it through /proc/self/clear_refs. glibc keeps freed
heap memory resident, so memory is measured in a child process (one per layer) run with
MALLOC_MMAP_THRESHOLD_=65536: every tensor larger than 64 KiB gets its own mapping, returned to the
OS when freed. Timing stays in this process, with the default allocator: mapping every tensor
afresh would add page faults that real training does not have. Memory, CUDA:
`torch.cuda.max_memory_allocated` above the allocation before the run, in this process.

The same run prints the machine's matrix-multiply rate in the benchmark's dtype, and each
method's forward rate (2 FLOPs per multiply-add of q.k and attn.v) as a fraction of it.
``tools/benchmark_na.py`` is the command line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from nat_mm.errors import NatMMError
from nat_mm.fileio import atomic_write_bytes
from nat_mm.ops import available_backends, na2d
from nat_mm.ops.reference import na2d_reference, random_inputs

# (stage, H, W, heads, dilation): NAT-Tiny / DiNAT-Tiny at 800 x 1216, head_dim 32, kernel 7.
LAYERS = [
    (1, 200, 304, 2, 1),
    (1, 200, 304, 2, 28),
    (2, 100, 152, 4, 1),
    (2, 100, 152, 4, 7),
    (2, 100, 152, 4, 14),
    (3, 50, 76, 8, 1),
    (3, 50, 76, 8, 3),
    (3, 50, 76, 8, 5),
    (3, 50, 76, 8, 7),
    (4, 25, 38, 16, 1),
    (4, 25, 38, 16, 3),
]
HEAD_DIM = 32
KERNEL = 7
MALLOC_ENV = 'MALLOC_MMAP_THRESHOLD_'

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, dilation: int
) -> torch.Tensor:
    """Swin-style (non-shifted) window attention, window = KERNEL, on [B, H, W, heads, D].

    `rpb` [heads, 2K-1, 2K-1] is gathered into the [heads, K*K, K*K] bias as Swin does.
    `dilation` is ignored: window attention has none; it is the same cost target.
    """
    batch, height, width, heads, head_dim = q.shape
    pad_h, pad_w = -height % KERNEL, -width % KERNEL
    windows_h, windows_w = (height + pad_h) // KERNEL, (width + pad_w) // KERNEL

    def partition(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
        x = x.view(batch, windows_h, KERNEL, windows_w, KERNEL, heads, head_dim)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(batch * windows_h * windows_w, heads, KERNEL * KERNEL, head_dim)

    coords = torch.stack(
        torch.meshgrid(torch.arange(KERNEL), torch.arange(KERNEL), indexing='ij')
    ).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + KERNEL - 1  # [2, K*K, K*K]
    bias = rpb[:, relative[0], relative[1]].to(q.dtype)  # [heads, K*K, K*K]
    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=bias)
    out = out.view(batch, windows_h, windows_w, heads, KERNEL, KERNEL, head_dim)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(
        batch, windows_h * KERNEL, windows_w * KERNEL, heads, head_dim
    )
    return out[:, :height, :width]


def methods(dilation: int, backends: list[str]) -> dict[str, Method]:
    table: dict[str, Method] = {}
    for name in backends:
        table[name] = lambda q, k, v, rpb, name=name: na2d(
            q, k, v, KERNEL, dilation, rpb=rpb, backend=name
        )
    table['oracle'] = lambda q, k, v, rpb: na2d_reference(q, k, v, KERNEL, dilation, rpb)
    table['window'] = lambda q, k, v, rpb: window_attention(q, k, v, rpb, dilation)
    return table


def make_inputs(
    batch: int, height: int, width: int, heads: int, device: str, dtype: torch.dtype
) -> Inputs:
    q, k, v, rpb = random_inputs((batch, height, width, heads, HEAD_DIM), (KERNEL, KERNEL), True)
    # q, k, v in the benchmark's dtype, the bias table in float32: what a layer under autocast has.
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    return tuple(x.requires_grad_() for x in (q, k, v, rpb.to(device)))


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def median_time(run: Callable[[], object], repeats: int, device: str) -> float:
    run()  # warm-up (caches, compilation)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _proc_status_bytes(key: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{key} not in /proc/self/status')


def peak_memory(run: Callable[[], object], device: str) -> float:
    """Peak extra memory (bytes) of one `run()` (see the module docstring)."""
    run()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open('/proc/self/clear_refs', 'w') as clear_refs:
        clear_refs.write('5')  # reset VmHWM to the current RSS
    before = _proc_status_bytes('VmRSS:')
    run()
    return _proc_status_bytes('VmHWM:') - before


def _forward_backward(method: Method, inputs: Inputs) -> Callable[[], None]:
    def run() -> None:
        method(*inputs).sum().backward()
        for x in inputs:
            x.grad = None

    return run


def measure(
    method: Method, inputs: Inputs, repeats: int, device: str, with_memory: bool
) -> dict[str, float | None]:
    def forward() -> None:
        with torch.no_grad():
            method(*inputs)

    forward_backward = _forward_backward(method, inputs)
    try:
        result: dict[str, float | None] = {'fwd': median_time(forward, repeats, device)}
    except RuntimeError as error:  # a backend that cannot run these inputs
        print(f'  skipped: {error}')
        return {'fwd': None, 'fwd_bwd': None, 'mem': None}
    try:
        result['fwd_bwd'] = median_time(forward_backward, repeats, device)
        result['mem'] = peak_memory(forward_backward, device) if with_memory else None
    except (RuntimeError, NotImplementedError):  # forward-only backends
        result['fwd_bwd'] = result['mem'] = None
    return result


@dataclass(frozen=True)
class NABenchmarkSettings:
    """What :func:`benchmark_na` measures (the command line's options)."""

    device: str = 'cpu'
    dtype: str = 'float32'
    repeats: int = 5
    stages: tuple[int, ...] = (1, 2, 3, 4)
    batch: int = 1
    threads: int = 1
    methods: tuple[str, ...] = ()  # a subset of the backends, 'oracle', 'window'; () = default
    oracle_max_tokens: int = 20000
    json_path: str | None = None  # also write the rows and the GEMM rate here


def _memory_child(settings: NABenchmarkSettings, layer: int, names: list[str]) -> dict:
    """Child mode: {method: peak bytes of one fwd+bwd} of one layer."""
    _, height, width, heads, dilation = LAYERS[layer]
    dtype = getattr(torch, settings.dtype)
    inputs = make_inputs(settings.batch, height, width, heads, settings.device, dtype)
    table = methods(dilation, [n for n in names if n not in ('oracle', 'window')])
    peaks = {}
    for name in names:
        try:
            peaks[name] = peak_memory(_forward_backward(table[name], inputs), settings.device)
        except (RuntimeError, NotImplementedError):
            peaks[name] = None
    return peaks


def cpu_memory(settings: NABenchmarkSettings, layer: int, names: list[str]) -> dict:
    """Peak memory of each method, measured in a child process (see the module docstring)."""
    request = json.dumps({'settings': asdict(settings), 'layer': layer, 'names': names})
    command = [sys.executable, '-m', 'nat_mm.analysis.benchmark_na', request]
    environment = {**os.environ, MALLOC_ENV: '65536'}
    child = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def _ratio(value: float | None, target: float | None) -> str:
    return f'{value / target:5.2f}x' if value is not None and target else '   - '


def _cell(value: float | None, unit: float, fmt: str) -> str:
    return format(value / unit, fmt) if value is not None else '-'.rjust(len(format(0.0, fmt)))


def layer_flops(batch: int, height: int, width: int, heads: int) -> int:
    """FLOPs of one neighborhood-attention forward (q.k and attn.v, 2 per multiply-add)."""
    return 2 * 2 * batch * heads * height * width * KERNEL * KERNEL * HEAD_DIM


def benchmark_na(settings: NABenchmarkSettings) -> list[dict]:
    """Measures every method on every selected layer; prints the table, returns its rows.

    Raises:
        NatMMError: A bad setting.
    """
    from nat_mm.analysis.benchmark import gemm_gflops

    if settings.dtype not in ('float32', 'float16', 'bfloat16'):
        raise NatMMError(
            f'expected float32, float16 or bfloat16, got {settings.dtype!r}', '--dtype'
        )
    unknown = set(settings.stages) - {layer[0] for layer in LAYERS}
    if unknown:
        raise NatMMError(f'stages are 1 to 4, got {sorted(unknown)}', '--stages')
    if settings.device.startswith('cuda') and not torch.cuda.is_available():
        raise NatMMError('no CUDA device is available', f'--device {settings.device}')
    torch.set_num_threads(settings.threads)
    dtype = getattr(torch, settings.dtype)
    rate = gemm_gflops(dtype, settings.device, settings.threads)
    print(
        f'torch {torch.__version__}, device {settings.device}, dtype {settings.dtype}, '
        f'batch {settings.batch}, threads {settings.threads}, repeats {settings.repeats}, '
        f'backends {available_backends()}; machine GEMM rate {rate:.0f} GFLOP/s'
    )
    print('time in ms (median), mem = peak extra MiB during fwd+bwd; ratios vs window attention;'
          ' fwd GF/s as a fraction of the GEMM rate')  # fmt: skip
    header = (
        f'{"layer":<22}{"method":<8}{"fwd":>9}{"fwd+bwd":>10}{"mem":>9}'
        f'{"fwd":>8}{"f+b":>8}{"mem":>8}{"GEMM":>7}'
    )
    print(header)
    print('-' * len(header))
    rows = []
    for layer, (stage, height, width, heads, dilation) in enumerate(LAYERS):
        if stage not in settings.stages:
            continue
        inputs = make_inputs(settings.batch, height, width, heads, settings.device, dtype)
        backends = available_backends()
        if settings.device == 'cpu' and not settings.methods:
            # On CPU, natten and flex are forward-only and build dense score matrices / masks
            # for maps this size (60800^2 at stage 1): opt in with --methods.
            backends = [name for name in backends if name in ('cpu', 'torch')]
        table = methods(dilation, backends)
        if height * width > settings.oracle_max_tokens:
            table.pop('oracle')
        if settings.methods:
            table = {name: method for name, method in table.items() if name in settings.methods}
        in_process_memory = settings.device != 'cpu'
        ordered = dict(sorted(table.items(), key=lambda item: item[0] != 'window'))
        results = {
            name: measure(method, inputs, settings.repeats, settings.device, in_process_memory)
            for name, method in ordered.items()
        }
        if not in_process_memory:
            for name, peak in cpu_memory(settings, layer, list(results)).items():
                results[name]['mem'] = peak if results[name]['fwd_bwd'] is not None else None
        target = results.get('window', {})
        label = f'S{stage} {height}x{width} h{heads} d{dilation}'
        flops = layer_flops(settings.batch, height, width, heads)
        for name, result in results.items():
            share = flops / result['fwd'] / 1e9 / rate if result['fwd'] else None
            print(
                f'{label:<22}{name:<8}'
                f'{_cell(result["fwd"], 1e-3, "9.1f")}{_cell(result["fwd_bwd"], 1e-3, "10.1f")}'
                f'{_cell(result["mem"], 2**20, "9.1f")}'
                f'{_ratio(result["fwd"], target.get("fwd")):>8}'
                f'{_ratio(result["fwd_bwd"], target.get("fwd_bwd")):>8}'
                f'{_ratio(result["mem"], target.get("mem")):>8}'
                f'{format(share, ".0%") if share is not None else "-":>7}'
            )
            rows.append(
                dict(result, layer=f'S{stage} d{dilation}', method=name, of_gemm_rate=share)
            )
            label = ''
        sys.stdout.flush()
    if settings.json_path is not None:
        report = {'settings': asdict(settings), 'gemm_gflops': rate, 'torch': torch.__version__,
                  'rows': rows}  # fmt: skip
        atomic_write_bytes(json.dumps(report, indent=2).encode(), settings.json_path)
    return rows


if __name__ == '__main__':  # the memory child of cpu_memory
    request = json.loads(sys.argv[1])
    child_settings = NABenchmarkSettings(**{
        key: tuple(value) if isinstance(value, list) else value
        for key, value in request['settings'].items()
    })  # fmt: skip
    torch.set_num_threads(child_settings.threads)
    print(json.dumps(_memory_child(child_settings, request['layer'], request['names'])))
