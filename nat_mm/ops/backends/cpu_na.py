"""Compiled CPU backend: exact neighborhood attention in plain C (`nat_mm/ops/csrc/`), via ctypes.

Every query visits exactly its Kh x Kw window, so no logit is computed and masked away and k / v
are never gathered into copies: this is the fast path on CPU. The C file needs no PyTorch headers;
it is built on first use with the system C compiler (`$CC`, else `cc`; OpenMP, `-march=native`,
about two seconds) into `$NAT_MM_CACHE/kernels/` (default `~/.cache/nat_mm/kernels/`), keyed by
the source, the flags, the compiler and the CPU, and published atomically so concurrent processes
(torchrun) can build it at once. Without a working compiler the backend reports why and na2d
falls back to the pure-PyTorch `torch` backend.

Storage dtypes float32, float64, bfloat16 and float16 (float16 needs F16C, AVX-512 or a compiler
with _Float16); bfloat16 / float16 are computed in float32 and rounded once, at the end, as CPU
attention kernels do; the RPB may have any float dtype and its gradient comes back in it. q, k and
v are read in place when they share strides and head_dim is contiguous (the views of one qkv
projection), and saved as they are: the backward recomputes the attention weights, so nothing
else is kept between forward and backward. Design and measurements: na2d_cpu_impl.h.
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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from . import torch_na
from .replay import replay_gradients
from .windows import axis_window

NAME = 'cpu'
# Storage dtype -> (suffix of its functions in na2d_cpu.c, dtype of its arithmetic: the RPB table
# and its gradient). Half types are computed in float32.
DTYPES = {
    torch.float32: ('f32', torch.float32),
    torch.float64: ('f64', torch.float64),
    torch.bfloat16: ('bf16', torch.float32),
    torch.float16: ('f16', torch.float32),
}
MAX_HEAD_DIM = 256  # MAX_DIM in na2d_cpu.c
MAX_WINDOW = 256  # MAX_WINDOW in na2d_cpu.c: Kh * Kw
SOURCE_DIR = pathlib.Path(__file__).resolve().parents[1] / 'csrc'
# Read at import: the library is built from this snapshot, so it always matches this module's
# ctypes declarations, even if the files change while a process runs.
SOURCES = {name: (SOURCE_DIR / name).read_bytes() for name in ('na2d_cpu.c', 'na2d_cpu_impl.h')}
# gnu11 rather than c11: ISO C mode turns off fusing a * b + c into FMA instructions. No
# -ffast-math: the softmax's exp is inline vector code (na2d_cpu.c), IEEE semantics keep NaN / inf
# inputs in their windows, and a library linked with it would turn on flush-to-zero for the whole
# process when it loads (crtfastmath.o, GCC < 13). -O2 runs 1.6x slower.
COMPILE_FLAGS = ('-O3', '-march=native', '-fopenmp', '-fPIC', '-std=gnu11')
LINK_FLAGS = ('-shared', '-fopenmp')
LIBRARIES = ('-lm',)
AXIS_TABLES = ('start', 'bias', 'order', 'first', 'count', 'query', 'slot', 'position')


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
        ('in_stride', ctypes.c_int64 * 4),
        ('out_stride', ctypes.c_int64 * 4),
        *((f'{axis}_{table}', ctypes.c_void_p) for axis in ('row', 'col') for table in AXIS_TABLES),
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
    for suffix, _ in DTYPES.values():
        for kind in ('forward', 'backward', 'chunk'):
            function = getattr(library, f'na2d_{kind}_{suffix}', None)
            if function is not None:  # float16 needs a compiler with _Float16
                function.restype = ctypes.c_int32
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
    library = _library()
    if not isinstance(library, str) and not hasattr(library, _symbol('forward', q.dtype)):
        return f'the compiled kernel has no {q.dtype} here (it needs F16C, AVX-512 or _Float16)'
    if q.shape[-1] > MAX_HEAD_DIM:
        return f'the compiled kernel supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}'
    if kernel_size[0] * kernel_size[1] > MAX_WINDOW:
        return f'the compiled kernel supports Kh * Kw <= {MAX_WINDOW}, got {kernel_size}'
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
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return CpuNeighborhoodAttention.apply(q, k, v, rpb, kernel_size, dilation, scale)
    head_dim = q.shape[-1]
    q, k, v = _kernel_inputs(q, k, v)
    return _forward(q, k, v, _kernel_rpb(rpb, q.dtype), kernel_size, dilation, scale)[
        ..., :head_dim
    ]


class AxisWindows(NamedTuple):
    """One axis's windows (int32 [length] unless noted), as na2d_cpu.c's geometry takes them."""

    start: torch.Tensor  # first key of each query's window
    bias: torch.Tensor  # RPB index of that key
    order: torch.Tensor  # positions by sub-lattice (consecutive queries share most keys)
    first: torch.Tensor  # where key j's queries start in `query` / `slot`
    count: torch.Tensor  # how many queries have key j in their window
    query: torch.Tensor  # [length * K]: those queries, ascending, key by key
    slot: torch.Tensor  # [length * K]: the window slot that key j is for each of them
    position: torch.Tensor  # where each position comes in `order`


@functools.lru_cache(maxsize=256)
def axis_windows(length: int, kernel_size: int, dilation: int) -> AxisWindows:
    """The windows of one axis and their inverse.

    The windows are `windows.axis_window`'s (NATTEN 0.14 semantics): slot s of query i is key
    `first_key[i] + s * d` with RPB index `bias[i] + s`. The inverse lists, for every key, the
    queries whose window holds it and at which slot (a contiguous run of its sub-lattice, longer
    near the borders).
    """
    position = torch.arange(length)
    first_key, bias = axis_window(length, kernel_size, dilation)
    order = torch.argsort(position % dilation * length + position // dilation)
    slots = torch.arange(kernel_size)
    keys = (first_key[:, None] + slots * dilation).flatten()  # [length * K], query-major
    queries = position.repeat_interleave(kernel_size)
    by_key = torch.argsort(keys * length + queries)
    count = torch.bincount(keys, minlength=length)
    first = torch.cumsum(count, 0) - count
    tables = (first_key, bias, order, first, count, queries[by_key], slots.repeat(length)[by_key])
    tables += (torch.argsort(order),)
    return AxisWindows(*(table.to(torch.int32) for table in tables))


def _geometry(
    q: torch.Tensor,
    out: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[_Geometry, tuple[AxisWindows, AxisWindows]]:
    """The C geometry of kernel inputs q (k, v share its strides) and contiguous outputs like
    `out`, and the tables it points to (keep them alive during the call)."""
    batch, height, width, heads, head_dim = q.shape
    rows = axis_windows(height, kernel_size[0], dilation[0])
    cols = axis_windows(width, kernel_size[1], dilation[1])
    geometry = _Geometry(
        batch, height, width, heads, head_dim, *kernel_size, *dilation,
        (ctypes.c_int64 * 4)(*q.stride()[:4]), (ctypes.c_int64 * 4)(*out.stride()[:4]),
        *(table.data_ptr() for table in (*rows, *cols)),
    )  # fmt: skip
    return geometry, (rows, cols)


def _pointer(x: torch.Tensor | None) -> ctypes.c_void_p | None:
    return ctypes.c_void_p(x.data_ptr()) if x is not None else None


def _symbol(kind: str, dtype: torch.dtype) -> str:
    return f'na2d_{kind}_{DTYPES[dtype][0]}'


def _kernel(kind: str, dtype: torch.dtype) -> Any:
    return getattr(_library(), _symbol(kind, dtype))


def _chunk(dtype: torch.dtype) -> int:
    """head_dim must be a multiple of this many elements (na2d_cpu_impl.h)."""
    return _kernel('chunk', dtype)()


def _kernel_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as the kernel reads them: as they are when head_dim is contiguous, a multiple of the
    kernel's chunk, and the three share strides (views of one qkv projection do); else
    contiguous copies, head_dim zero-padded (zeros change no dot product)."""
    pad = -tensors[0].shape[-1] % _chunk(tensors[0].dtype)
    if pad:
        return tuple(F.pad(x, (0, pad)) for x in tensors)
    strides = tensors[0].stride()
    if strides[-1] == 1 and all(x.stride() == strides for x in tensors):
        return tensors
    return tuple(x.contiguous() for x in tensors)


def _kernel_rpb(rpb: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The RPB table in the kernel's arithmetic dtype (float32 for half inputs), contiguous."""
    return rpb.to(DTYPES[dtype][1]).contiguous() if rpb is not None else None


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError('na2d cpu kernel: could not allocate its scratch memory')


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """The C forward on `_kernel_inputs`; returns the output (head_dim as padded)."""
    out = torch.empty(q.shape, dtype=q.dtype)
    geometry, _tables = _geometry(q, out, kernel_size, dilation)
    _check(
        _kernel('forward', q.dtype)(
            ctypes.byref(geometry),
            *(_pointer(x) for x in (q, k, v, rpb)),
            ctypes.c_double(scale),
            _pointer(out),
            ctypes.c_int32(torch.get_num_threads()),
        )
    )
    return out


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    grad_out: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
    rpb_grad: bool,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The C backward on `_kernel_inputs`, their kernel rpb and a contiguous grad_out.

    Work items are (batch, head, row sub-lattice, chunk of it). By default the sub-lattices are
    split only when there are fewer of them than threads; a chunk recomputes the few query rows
    around it that it needs, and any split gives the same result.
    """
    batch, height, _, heads, _ = q.shape
    real = DTYPES[q.dtype][1]
    grad_q, grad_k, grad_v = (torch.empty(q.shape, dtype=q.dtype) for _ in range(3))
    rpb_partial = grad_rpb = None
    if rpb_grad:
        table = (2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        rpb_partial = torch.empty(batch * heads * height, table[0] * table[1], dtype=real)
        grad_rpb = torch.empty(heads, *table, dtype=real)
    threads = torch.get_num_threads()
    if chunks is None:
        chunks = -(-threads // (batch * heads * dilation[0]))
    geometry, _tables = _geometry(q, grad_q, kernel_size, dilation)
    _check(
        _kernel('backward', q.dtype)(
            ctypes.byref(geometry),
            *(_pointer(x) for x in (q, k, v, rpb)),
            ctypes.c_double(scale),
            *(_pointer(x) for x in (grad_out, grad_q, grad_k, grad_v, rpb_partial, grad_rpb)),
            ctypes.c_int32(chunks),
            ctypes.c_int32(threads),
        )
    )
    return grad_q, grad_k, grad_v, grad_rpb


class CpuNeighborhoodAttention(torch.autograd.Function):
    """The C forward and backward as one autograd node.

    Saves q, k, v as given (views of a qkv projection are not copied) and the RPB table: the
    backward recomputes the attention weights. With `create_graph=True` (double backward) the
    backward differentiates the `torch` backend's forward on the saved inputs instead, so the
    gradients are differentiable again.
    """

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
        inputs = _kernel_inputs(q, k, v)
        out = _forward(*inputs, _kernel_rpb(rpb, q.dtype), kernel_size, dilation, scale)
        ctx.save_for_backward(q, k, v, rpb)
        ctx.options = (kernel_size, dilation, scale)
        return out[..., :head_dim]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, rpb = ctx.saved_tensors
        kernel_size, dilation, scale = ctx.options
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            return _replay_backward(q, k, v, rpb, kernel_size, dilation, scale, grad_out, needs)
        rpb_grad = rpb is not None and needs[3]
        grads = gradients(q, k, v, rpb, grad_out, kernel_size, dilation, scale, rpb_grad)
        return *grads, None, None, None


def gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    grad_out: torch.Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
    rpb_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The C backward of validated CPU inputs: gradients of q, k, v (as given, possibly strided
    views) and of the RPB table in its own dtype (None unless `rpb_grad`).

    Shared by `CpuNeighborhoodAttention` and the operator `nat_mm::na2d_backward`
    (`nat_mm/ops/library.py`).
    """
    head_dim = q.shape[-1]
    (grad_in,) = _kernel_inputs(grad_out)
    grads = _backward(
        *_kernel_inputs(q, k, v), _kernel_rpb(rpb, q.dtype), grad_in.contiguous(),
        kernel_size, dilation, scale, rpb_grad,
    )  # fmt: skip
    grad_q, grad_k, grad_v = (grad[..., :head_dim] for grad in grads[:3])
    grad_rpb = grads[3].to(rpb.dtype) if grads[3] is not None else None
    return grad_q, grad_k, grad_v, grad_rpb


def _replay_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    scale: float,
    grad_out: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients with a graph (double backward): autograd through the `torch` backend."""

    def replay(q, k, v, rpb):
        return torch_na.forward(q, k, v, kernel_size, dilation, rpb, scale)

    grads = replay_gradients(replay, (q, k, v, rpb), needs_input_grad[:4], grad_out, True)
    return (*grads, None, None, None)
