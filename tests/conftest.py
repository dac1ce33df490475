"""Shared paths, settings and fixtures of the test suite.

torch's CPU threads are set here, once for the whole run (``NAT_MM_TEST_THREADS``, default 2: the
CI machine has 2 cores); a test that needs another count takes the ``set_threads`` fixture, which
restores the suite's setting afterwards. Test modules cannot import this file (pytest runs with
``--import-mode=importlib``): everything shared is a fixture, or the ``requires_cpu_kernel``
marker for tests of the compiled CPU kernel (a broken kernel build fails them wherever a C compiler
exists; they skip only without one).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIGS = REPO_ROOT / 'configs' / 'demo'

torch.set_num_threads(int(os.environ.get('NAT_MM_TEST_THREADS', '2')))


@pytest.fixture
def set_threads() -> Iterator[Callable[[int], None]]:
    """``set_threads(n)`` changes torch's CPU threads for this test only."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope='session')
def det_demo_config() -> str:
    """The CPU-sized Mask R-CNN + NAT config of the main job."""
    return str(DEMO_CONFIGS / 'mask-rcnn_nat-demo_fpn_shapes-128.py')


@pytest.fixture(scope='session')
def seg_demo_config() -> str:
    """The CPU-sized UPerNet + DiNAT config of the main job."""
    return str(DEMO_CONFIGS / 'dinat-demo_upernet_shapes-128.py')


# ----------------------------------------------------------------------------- running tools


@pytest.fixture(scope='session')
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli('train', arg, ...)``: ``python -m nat_mm.tools.train arg ...`` in a subprocess
    (for exit statuses and stderr as a user sees them)."""

    def run(name: str, *args: object, timeout: float = 600, cwd: object = None):
        return subprocess.run(
            [sys.executable, '-m', f'nat_mm.tools.{name}', *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or REPO_ROOT,
        )

    return run


@pytest.fixture(scope='session')
def call_tool() -> Callable[..., int]:
    """``call_tool('test', [args])``: a tool's ``main`` in this process; returns its exit status
    (read its stderr with ``capsys``)."""

    def call(name: str, argv: list[object]) -> int:
        return importlib.import_module(f'nat_mm.tools.{name}').main([str(a) for a in argv])

    return call


# ----------------------------------------------------------------------------- data and files


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory) -> str:
    """A tiny demo dataset (4 train / 2 val images of 64 px) in all three formats."""
    from nat_mm.data import DemoDataSettings, generate_demo_datasets

    root = tmp_path_factory.mktemp('demo_data')
    generate_demo_datasets(str(root), DemoDataSettings(num_train=4, num_val=2, height=64, width=64))
    return str(root)


@pytest.fixture
def http_root(tmp_path, monkeypatch) -> Iterator[tuple[pathlib.Path, str]]:
    """Serves tmp_path/'www' on 127.0.0.1; downloads are cached under tmp_path/'torch_home'."""
    root = tmp_path / 'www'
    root.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


class _WritesMarker:
    """Unpickling it runs ``open(path, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.fixture
def write_payload(tmp_path) -> Callable[..., tuple[str, pathlib.Path]]:
    """``write_payload(checkpoint_dict, name)`` saves the dict with an object whose unpickling
    creates a marker file; returns (path, marker). The test asserts the marker never appears."""

    def write(checkpoint: dict, name: str = 'payload.pth') -> tuple[str, pathlib.Path]:
        marker = tmp_path / f'{name}.EXECUTED'
        path = tmp_path / name
        torch.save({**checkpoint, 'payload': _WritesMarker(str(marker))}, path)
        return str(path), marker

    return write


# ----------------------------------------------------------------------------- the CPU kernel


def _c_compiler() -> str | None:
    """The compiler the `cpu` backend builds its kernel with (`$CC`, else `cc`; as cpu_na does)."""
    return shutil.which(os.environ.get('CC', 'cc'))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        'markers',
        'requires_cpu_kernel: needs the compiled CPU kernel; skips only where no C compiler '
        'exists, fails where one exists and the kernel does not build',
    )


_KERNEL_BROKEN = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """`requires_cpu_kernel`: checked before the test's fixtures, which may redirect the cache."""
    if item.get_closest_marker('requires_cpu_kernel') is None:
        return
    from nat_mm.ops.backends import cpu_na

    reason = cpu_na.unavailable_reason()
    if reason is None:
        return
    if _c_compiler() is None:
        pytest.skip(f'compiled CPU kernel unavailable: {reason}')
    item.stash[_KERNEL_BROKEN] = reason


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # Raised in the call phase so that a broken build reports the test FAILED, not a setup error.
    reason = item.stash.get(_KERNEL_BROKEN, None)
    if reason is not None:
        compiler = _c_compiler()
        message = f'{compiler} is present but the CPU kernel is unavailable: {reason}'
        pytest.fail(message, pytrace=False)


@pytest.fixture
def c_compiler() -> str | None:
    """The C compiler the `cpu` backend would use, or None where there is none."""
    return _c_compiler()


@pytest.fixture
def auto_cpu_backend() -> str:
    """What na2d must pick for float32 on CPU: `cpu` wherever a C compiler exists (a kernel that
    fails to build then fails the test), `torch` only without one."""
    return 'cpu' if _c_compiler() is not None else 'torch'
