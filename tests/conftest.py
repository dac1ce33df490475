"""Shared paths, settings and fixtures of the test suite.

torch's CPU threads are set here, once for the whole run (``NAT_MM_TEST_THREADS``, default 2: the
CI machine has 2 cores); a test that needs another count takes the ``set_threads`` fixture, which
restores the suite's setting afterwards. Test modules cannot import this file (pytest runs with
``--import-mode=importlib``): everything shared is a fixture.
"""

from __future__ import annotations

import os
import pathlib
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
