"""What every command-line tool shares: one error convention and the common arguments."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Callable

from mmengine.config import DictAction

from nat_mm.errors import NatMMError

EXIT_BAD_INPUT = 2  # as argparse exits for a bad command line
# Deprecation notices about the host libraries' own code, which a nat_mm user cannot act on:
# (category, start of the message). The tools hide them while they run; code that imports
# nat_mm keeps every warning.
THIRD_PARTY_WARNINGS = (
    (UserWarning, 'pkg_resources is deprecated as an API'),  # mmengine's is_installed()
    (UserWarning, '``build_loss`` would be deprecated soon'),  # mmseg's decode heads
    (UserWarning, 'torch.meshgrid: in an upcoming release'),  # mmcv / mmdet positional code
)


def run(work: Callable[[], object]) -> int:
    """Runs a tool's work; a :class:`NatMMError` becomes ``error: ...`` on stderr and status 2.

    :data:`THIRD_PARTY_WARNINGS` are not shown while the work runs.

    Returns:
        The exit status: 0, or 2 for bad input.
    """
    with warnings.catch_warnings():
        for category, message in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings('ignore', message=re.escape(message), category=category)
        try:
            work()
        except NatMMError as error:
            print(f'error: {error}', file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (e.g. train_cfg.max_iters=100)',
    )


def add_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='unpickle the checkpoint with the full pickle module: it can then run code, so only '
        'for files you trust (default: tensors and a short allowlist, docs/checkpoints.md)',
    )


def add_sha256(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--sha256',
        help="the checkpoint's expected SHA-256 (8 to 64 leading hex digits): a prefix checks "
        'integrity, against a hostile host give all 64 (under 16 warns)',
    )


def add_force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument('--force', action='store_true', help=f'overwrite {what}')


def add_launcher(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    # Old launchers pass --local-rank; torchrun sets LOCAL_RANK itself.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
