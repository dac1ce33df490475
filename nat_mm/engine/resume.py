"""Which checkpoint ``--resume`` continues from: the newest complete one, and say why.

mmengine resumes from whatever the ``last_checkpoint`` pointer names, and restarts from iteration
0 when the pointer is missing. A run killed while saving can leave a pointer that is empty,
names a file that is not there, or lags behind the newest checkpoint; a half-written file can be
lying there too. :func:`find_resume_checkpoint` looks at the pointer's file and every
``iter_N.pth`` / ``epoch_N.pth`` of the checkpoint folders, keeps the complete ones (a readable
torch zip archive with its pickle inside), and takes the one written last.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable

from mmengine.logging import print_log

from nat_mm.errors import NatMMError

POINTER_NAME = 'last_checkpoint'
_NUMBERED = re.compile(r'(iter|epoch)_(\d+)\.pth')


def checkpoint_folders(work_dir: str, out_dirs: Iterable[str | None]) -> list[str]:
    """The work dir and the folders ``CheckpointHook(out_dir=...)`` saves to: ``out_dir`` joined
    with the work dir's name, as mmengine does."""
    name = os.path.basename(work_dir.rstrip(os.sep))
    return [work_dir, *(os.path.join(out_dir, name) for out_dir in out_dirs if out_dir)]


def is_run_checkpoint_name(name: str) -> bool:
    """``iter_N.pth``, ``epoch_N.pth`` or the ``last_checkpoint`` pointer: what a run saves."""
    return name == POINTER_NAME or _NUMBERED.fullmatch(name) is not None


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint written by ``torch.save``, or None.

    A file cut short by a kill has no zip central directory (it is written last), so it fails
    here without being unpickled.
    """
    if not os.path.isfile(path):
        return 'does not exist'
    if os.path.getsize(path) == 0:
        return 'is empty'
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(
                name.endswith('/data.pkl') or name == 'data.pkl' for name in archive.namelist()
            ):
                return 'is a zip file without a pickled checkpoint in it'
    except (zipfile.BadZipFile, OSError) as error:
        return f'is not a complete torch checkpoint ({error})'
    return None


def _pointed(work_dir: str) -> tuple[str | None, str]:
    """The file the pointer names (or None) and a description of the pointer."""
    pointer = os.path.join(work_dir, POINTER_NAME)
    if not os.path.isfile(pointer):
        return None, f'{pointer} does not exist'
    with open(pointer) as f:
        named = f.read().strip()
    if not named:
        return None, f'{pointer} is empty'
    return named, f'{pointer} names {named}'


def find_resume_checkpoint(work_dir: str, folders: Iterable[str] = ()) -> str | None:
    """The checkpoint to resume a run from; logs which one and why.

    Args:
        work_dir: The run's work dir (holds the ``last_checkpoint`` pointer).
        folders: Other folders checkpoints are saved in (``CheckpointHook(out_dir=...)``).

    Returns:
        The newest complete checkpoint (by modification time, then step number), or None when
        the folders hold no checkpoint at all.

    Raises:
        NatMMError: Checkpoints exist but none is complete.
    """
    named, pointer_state = _pointed(work_dir)
    candidates = {named} if named else set()
    for folder in {work_dir, *folders, *([os.path.dirname(named)] if named else [])}:
        if os.path.isdir(folder):
            candidates |= {
                os.path.join(folder, n) for n in os.listdir(folder) if _NUMBERED.fullmatch(n)
            }
    if not candidates:
        print_log(
            f'no checkpoint in {work_dir}: training starts from the beginning', logger='current'
        )
        return None
    problems = {path: checkpoint_problem(path) for path in candidates}
    complete = [path for path, problem in problems.items() if problem is None]
    if not complete:
        listing = '; '.join(f'{path} {problem}' for path, problem in sorted(problems.items()))
        raise NatMMError(f'no complete checkpoint to resume from: {listing}', work_dir)

    def age(path: str) -> tuple[int, int]:
        match = _NUMBERED.fullmatch(os.path.basename(path))
        return os.stat(path).st_mtime_ns, int(match[2]) if match else -1

    chosen = max(complete, key=age)
    if chosen != named:
        skipped = [f'{path} {problem}' for path, problem in sorted(problems.items()) if problem]
        print_log(
            f'{pointer_state}; resuming from the newest complete checkpoint {chosen}'
            + (f' (skipped: {"; ".join(skipped)})' if skipped else ''),
            logger='current',
            level=logging.WARNING,
        )
    return chosen
