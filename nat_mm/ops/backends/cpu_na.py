"""Compiled CPU backend: exact neighborhood attention in plain C (`nat_mm/ops/csrc/`), via ctypes.

Every query visits exactly its Kh x Kw window, so no logit is computed and masked away and k / v
are never gathered into copies: this is the fast path on CPU. The C file needs no PyTorch headers;
it is built on first use with the system C compiler (`$CC`, else `cc`; OpenMP, `-march=native`,
about a second) into `$NAT_MM_CACHE/kernels/` (default `~/.cache/nat_mm/kernels/`), keyed by the
source, the flags, the compiler and the CPU, and published atomically so concurrent processes
(torchrun) can build it at once. Without a working compiler the backend reports why and na2d
falls back to the pure-PyTorch `torch` backend.

float32 and float64 run natively. With autograd the forward keeps each query's Kh * Kw attention
probabilities (what window attention keeps too) besides q, k and v; the backward runs in parallel
over (batch, head, sub-lattice, stripe of rows) items that never write the same key.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

NAME = 'cpu'
DTYPES = {torch.float32: 'f32', torch.float64: 'f64'}
VECTOR_BYTES = 32  # rows of q, k, v are padded to whole AVX vectors (na2d_cpu_impl.h)
MAX_HEAD_DIM = 256  # MAX_DIM in na2d_cpu.c
SOURCE_DIR = pathlib.Path(__file__).resolve().parents[1] / 'csrc'
# Read at import: the library is built from this snapshot, so it always matches this module's
# ctypes declarations, even if the files change while a process runs.
SOURCES = {name: (SOURCE_DIR / name).read_bytes() for name in ('na2d_cpu.c', 'na2d_cpu_impl.h')}
# gnu11 rather than c11: ISO C mode turns off fusing a * b + c into FMA instructions. -ffast-math
# lets the softmax call glibc's vector exp (libmvec): half the forward's time. It is given to the
# compile step only: linking with it would add crtfastmath.o, which turns on flush-to-zero for the
# whole process when the library loads (GCC < 13).
COMPILE_FLAGS = ('-O3', '-march=native', '-fopenmp', '-fPIC', '-std=gnu11', '-ffast-math')
LINK_FLAGS = ('-shared', '-fopenmp')
LIBRARIES = ('-lmvec', '-lm')


class _Geometry(ctypes.Structure):
    """Mirror of `na2d_geometry` in na2d_cpu.c."""

    _fields_ = [
        ('batch', ctypes.c_int64),
        ('height', ctypes.c_int64),
        ('width', ctypes.c_int64),
        ('heads', ctypes.c_int64),
        ('dim', ctypes.c_int64),
        ('kernel_h', ctypes.c_int32),
        ('kernel_w', ctypes.c_int32),
        ('dilation_h', ctypes.c_int32),
        ('dilation_w', ctypes.c_int32),
        ('row_start', ctypes.c_void_p),
        ('row_bias', ctypes.c_void_p),
        ('col_start', ctypes.c_void_p),
        ('col_bias', ctypes.c_void_p),
        ('row_order', ctypes.c_void_p),
        ('col_order', ctypes.c_void_p),
    ]


def _cache_dir() -> pathlib.Path:
    root = os.environ.get('NAT_MM_CACHE') or pathlib.Path.home() / '.cache' / 'nat_mm'
    return pathlib.Path(root) / 'kernels'


def _cpu_signature() -> str:
    """CPU model and flags: `-march=native` code must not run on another CPU."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(('model name', 'flags'))]
    except OSError:
        lines = []
    return platform.machine() + ''.join(sorted(set(lines)))


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The compiled kernel library, or why it could not be built / loaded."""
    compiler = shutil.which(os.environ.get('CC', 'cc'))
    if compiler is None:
        return f'no C compiler found (CC={os.environ.get("CC", "cc")!r})'
    try:
        version = subprocess.run(
            [compiler, '--version'], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return f'C compiler {compiler} does not run: {error}'
    digest = hashlib.sha256()
    for text in SOURCES.values():
        digest.update(text)
    flags = ' '.join((*COMPILE_FLAGS, *LINK_FLAGS, *LIBRARIES))
    digest.update(flags.encode() + version.encode() + _cpu_signature().encode())
    target = _cache_dir() / f'na2d_cpu_{digest.hexdigest()[:16]}.so'
    if not target.exists():
        reason = _build(compiler, target)
        if reason is not None:
            return reason
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        return f'cannot load {target}: {error}'
    for suffix in DTYPES.values():
        getattr(library, f'na2d_forward_{suffix}').restype = None
        getattr(library, f'na2d_backward_{suffix}').restype = None
    return library


def _build(compiler: str, target: pathlib.Path) -> str | None:
    """Compile the kernel into `target` (atomically); None on success, else the reason."""
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        for name, text in SOURCES.items():
            (pathlib.Path(scratch) / name).write_bytes(text)
        source, built = pathlib.Path(scratch) / 'na2d_cpu.c', pathlib.Path(scratch) / target.name
        objects = str(source.with_suffix('.o'))
        for command in (
            [compiler, *COMPILE_FLAGS, '-c', str(source), '-o', objects],
            [compiler, *LINK_FLAGS, objects, *LIBRARIES, '-o', str(built)],
        ):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                return (
                    f'building the CPU kernel failed ({" ".join(command)}):\n'
                    f'{result.stderr[-2000:]}'
                )
        os.replace(built, target)
    print_log(
        f'na2d: built the CPU kernel in {time.perf_counter() - start:.1f} s: {target}',
        logger='current',
        level=logging.INFO,
    )
    return None


def unavailable_reason() -> str | None:
    """Why the compiled kernel cannot run here (no compiler, build failed), or None."""
    library = _library()
    return library if isinstance(library, str) else None


def can_run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
) -> str | None:
    """Why the CPU kernel cannot compute these inputs, or None."""
    if q.device.type != 'cpu':
        return f'the compiled kernel runs on CPU, got device {q.device}'
    if q.dtype not in DTYPES:
        return f'the compiled kernel supports {tuple(DTYPES)}, got {q.dtype}'
    if q.shape[-1] > MAX_HEAD_DIM:
        return f'the compiled kernel supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}'
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Neighborhood attention on validated CPU inputs [B, H, W, heads, head_dim]."""
    rpb = rpb.to(q.dtype) if rpb is not None else None
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return CpuNeighborhoodAttention.apply(q, k, v, rpb, kernel_size, dilation, scale)
    head_dim = q.shape[-1]
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    return _forward(q, k, v, rpb, kernel_size, dilation, scale)[..., :head_dim]


@functools.lru_cache(maxsize=256)
def axis_windows(
    length: int, kernel_size: int, dilation: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First key of each position's window on one axis, that key's RPB index, a visiting order.

    NATTEN 0.14 semantics: position i lies on sub-lattice `i % d` at index `p = i // d`; its window
    is K consecutive sub-lattice positions starting at `clamp(p - K // 2, 0, n - K)`, n being the
    sub-lattice's length; slot s is key `(start + s) * d + i % d` with RPB index
    `start + s - p + K - 1`.

    Returns:
        (start, bias, order) int32 [length] tensors: key of slot 0, its RPB index, and the
        positions sorted by sub-lattice (consecutive queries then share most of their keys).
    """
    position = torch.arange(length)
    residue, index = position % dilation, position // dilation
    sub_length = (length - residue + dilation - 1) // dilation
    start = torch.minimum((index - kernel_size // 2).clamp(min=0), sub_length - kernel_size)
    key = start * dilation + residue
    bias = start - index + kernel_size - 1
    order = torch.argsort(residue * length + index)
    return key.to(torch.int32), bias.to(torch.int32), order.to(torch.int32)


def _geometry(
    q: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[_Geometry, tuple[torch.Tensor, ...]]:
    """The C geometry struct and the tensors it points to (keep them alive during the call)."""
    batch, height, width, heads, head_dim = q.shape
    row_start, row_bias, row_order = axis_windows(height, kernel_size[0], dilation[0])
    col_start, col_bias, col_order = axis_windows(width, kernel_size[1], dilation[1])
    tables = (row_start, row_bias, col_start, col_bias, row_order, col_order)
    geometry = _Geometry(
        batch, height, width, heads, head_dim, *kernel_size, *dilation,
        *(table.data_ptr() for table in tables),
    )  # fmt: skip
    return geometry, tables


def _pointer(x: torch.Tensor | None) -> ctypes.c_void_p | None:
    return ctypes.c_void_p(x.data_ptr()) if x is not None else None


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """Contiguous, head_dim zero-padded to whole vectors (zeros change no dot product)."""
    lanes = VECTOR_BYTES // x.element_size()
    pad = -x.shape[-1] % lanes
    return F.pad(x, (0, pad)).contiguous() if pad else x.contiguous()


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
    saved_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The C forward on q, k, v in `_kernel_layout`; returns the output in that layout (head_dim
    still padded) and fills `saved_probs` [B, H, W, heads, Kh * Kw] when given."""
    rpb = rpb.contiguous() if rpb is not None else None
    out = torch.empty_like(q)
    geometry, _tables = _geometry(q, kernel_size, dilation)
    kernel = getattr(_library(), f'na2d_forward_{DTYPES[q.dtype]}')
    kernel(
        ctypes.byref(geometry),
        *(_pointer(x) for x in (q, k, v, rpb)),
        ctypes.c_double(scale),
        _pointer(out),
        _pointer(saved_probs),
        ctypes.c_int32(torch.get_num_threads()),
    )
    return out


class CpuNeighborhoodAttention(torch.autograd.Function):
    """The C forward and backward as one autograd node (saves q, k, v and the probabilities)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rpb: torch.Tensor | None,
        kernel_size: tuple[int, int],
        dilation: tuple[int, int],
        scale: float,
    ) -> torch.Tensor:
        head_dim = q.shape[-1]
        q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
        probs = q.new_empty(*q.shape[:4], kernel_size[0] * kernel_size[1])
        out = _forward(q, k, v, rpb, kernel_size, dilation, scale, probs)
        ctx.save_for_backward(q, k, v, probs)
        ctx.options = (kernel_size, dilation, scale, head_dim, rpb is not None)
        return out[..., :head_dim]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, probs = ctx.saved_tensors
        kernel_size, dilation, scale, head_dim, has_rpb = ctx.options
        grad_out = _kernel_layout(grad_out)
        grad_q = torch.empty_like(q)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_rpb = None
        if has_rpb and ctx.needs_input_grad[3]:
            heads = q.shape[3]
            grad_rpb = q.new_zeros(heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        geometry, _tables = _geometry(q, kernel_size, dilation)
        kernel = getattr(_library(), f'na2d_backward_{DTYPES[q.dtype]}')
        kernel(
            ctypes.byref(geometry),
            *(_pointer(x) for x in (q, k, v, probs)),
            ctypes.c_double(scale),
            *(_pointer(x) for x in (grad_out, grad_q, grad_k, grad_v, grad_rpb)),
            ctypes.c_int32(torch.get_num_threads()),
        )
        grads = (grad[..., :head_dim] for grad in (grad_q, grad_k, grad_v))
        return *grads, grad_rpb, None, None, None
