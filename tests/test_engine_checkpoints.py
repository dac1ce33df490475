"""Crash-safe checkpoint saving (CrashSafeCheckpointHook), safe and strict loading and resuming
(SafeLoadRunner, find_resume_checkpoint), on a toy model that trains in a second.

Kills are real (SIGKILL) and land at chosen moments of a save: a child process trains, and a
patch in that child (never in nat_mm) kills it halfway through writing the checkpoint, or after
the checkpoint is in place but before the pointer is written.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

from nat_mm.engine import checkpoint_problem, find_resume_checkpoint, remove_partial_files
from nat_mm.errors import NatMMError

# A child that trains a toy model with nat_mm's runner and hook, optionally killed once.
TRAIN_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import nat_mm
    from nat_mm.engine import SafeLoadRunner
    import nat_mm.engine.checkpoint_hook as hook_module
    from mmengine.fileio.backends.local_backend import LocalBackend
    from mmengine.runner import Runner

    work_dir, max_iters, keep, kill_at, kill_step, plain = sys.argv[1:7]
    max_iters, keep, kill_step = int(max_iters), int(keep), int(kill_step)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)
            self.data_preprocessor = nn.Identity()
        def forward(self, inputs, labels, mode='tensor'):
            out = self.linear(inputs)
            return {'loss': ((out.squeeze(-1) - labels) ** 2).mean()} if mode == 'loss' else out
        def train_step(self, data, optim_wrapper):
            losses = self(**data, mode='loss')
            optim_wrapper.update_params(losses['loss'])
            return {'loss': losses['loss'].detach()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            x = torch.tensor([float(i), 1.0])
            return {'inputs': x, 'labels': x.sum()}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == 'partial':  # half the checkpoint's bytes are on disk, then the kill
        put = LocalBackend.put
        def half_put(self, obj, filepath):
            if str(filepath).endswith(f'.iter_{kill_step}.pth.partial'):
                with open(filepath, 'wb') as f:
                    f.write(obj[: len(obj) // 2])
                die()
            put(self, obj, filepath)
        LocalBackend.put = half_put
    elif kill_at == 'before_pointer':  # the checkpoint is in place, the pointer not yet
        write = hook_module.atomic_write_bytes
        def pointer_write(data, path):
            if data.decode().endswith(f'iter_{kill_step}.pth'):
                die()
            write(data, path)
        hook_module.atomic_write_bytes = pointer_write

    runner_class = Runner if plain == 'plain' else SafeLoadRunner
    hook = 'CheckpointHook' if plain == 'plain' else 'CrashSafeCheckpointHook'
    runner = runner_class(
        model=Toy(), work_dir=work_dir,
        train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=[dict(type='LinearLR', by_epoch=False, begin=0, end=4)],
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type=hook, interval=2, by_epoch=False,
                                           max_keep_ckpts=keep)),
        resume=True, default_scope='mmengine')
    runner.train()
    print('TRAINED TO', runner.iter)
""")


def train_child(work_dir, max_iters=8, keep=1, kill_at='none', kill_step=0, plain=False):
    """Runs TRAIN_CHILD; returns the completed process (SIGKILL -> returncode -9)."""
    command = [sys.executable, '-c', TRAIN_CHILD, str(work_dir), str(max_iters), str(keep),
               kill_at, str(kill_step), 'plain' if plain else 'nat_mm']  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def saved_iter(path) -> int:
    from nat_mm.checkpoint import load_checkpoint

    return load_checkpoint(str(path))['meta']['iter']


def saved_weights(path) -> dict:
    from nat_mm.checkpoint import load_checkpoint

    return load_checkpoint(str(path))['state_dict']


def assert_trained_on(start: dict, path) -> None:
    """The checkpoint at `path` holds other weights than `start`: the resumed run trained."""
    end = saved_weights(path)
    assert end.keys() == start.keys()
    assert not all(torch.equal(end[name], start[name]) for name in start), 'no step was taken'


def assert_finished(work_dir, max_iters, keep):
    """The run ended at max_iters, kept at most `keep` checkpoints, left no temporary file."""
    names = sorted(os.listdir(work_dir))
    assert saved_iter(work_dir / f'iter_{max_iters}.pth') == max_iters
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / f'iter_{max_iters}.pth')
    assert not [name for name in names if name.endswith('.partial')], names
    assert len([name for name in names if name.endswith('.pth')]) <= keep, names


# ----------------------------------------------------------------------------- kill and resume


def test_kill_while_writing_with_one_kept_checkpoint_resumes(tmp_path):
    work_dir = tmp_path / 'work'
    killed = train_child(work_dir, keep=1, kill_at='partial', kill_step=4)
    assert killed.returncode == -9
    # mmengine would have removed iter_2.pth before writing iter_4.pth: here it survives.
    assert sorted(os.listdir(work_dir)).count('iter_2.pth') == 1
    assert checkpoint_problem(str(work_dir / '.iter_4.pth.partial')) is not None
    start = saved_weights(work_dir / 'iter_2.pth')
    resumed = train_child(work_dir, keep=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 2' in resumed.stderr + resumed.stdout
    assert 'TRAINED TO 8' in resumed.stdout
    assert_finished(work_dir, 8, keep=1)
    assert_trained_on(start, work_dir / 'iter_8.pth')


@pytest.mark.slow
@pytest.mark.parametrize('keep', [1, 2])
@pytest.mark.parametrize(
    ('kills', 'resumed_at'),
    [
        ([('partial', 4)], 2),
        ([('before_pointer', 4)], 4),  # the newest complete file wins over the lagging pointer
        ([('partial', 4), ('partial', 4)], 2),  # killed twice at the same save
        ([('before_pointer', 4), ('partial', 6)], 4),  # killed again after resuming
    ],
)
def test_kill_matrix(tmp_path, keep, kills, resumed_at):
    work_dir = tmp_path / 'work'
    for kill_at, step in kills:
        assert train_child(work_dir, keep=keep, kill_at=kill_at, kill_step=step).returncode == -9
    resumed = train_child(work_dir, keep=keep)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed epoch: 0, iter: {resumed_at}' in resumed.stderr + resumed.stdout
    assert_finished(work_dir, 8, keep)


def test_a_run_written_by_plain_mmengine_resumes_without_trust(tmp_path):
    work_dir = tmp_path / 'work'
    first = train_child(work_dir, max_iters=4, keep=2, plain=True)
    assert first.returncode == 0, first.stderr[-3000:]
    if Version(torch.__version__) >= Version('2.6'):
        # torch's weights-only default refuses the message hub's HistoryBuffers: what broke
        # mmengine 0.10's own resume on torch >= 2.6.
        with pytest.raises(pickle.UnpicklingError):
            torch.load(work_dir / 'iter_4.pth')
    start = saved_weights(work_dir / 'iter_4.pth')
    resumed = train_child(work_dir, max_iters=6, keep=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 4' in resumed.stderr + resumed.stdout
    assert saved_iter(work_dir / 'iter_6.pth') == 6
    assert_trained_on(start, work_dir / 'iter_6.pth')


def test_a_file_without_training_state_is_refused_for_resume_before_loading(tmp_path):
    """An mmcv 1.x file (meta with epoch / iter, weights, optimizer; no message hub), as
    upstream's trained detectors are, cannot be resumed: a clear error, not a KeyError."""
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    mmcv1 = {
        'meta': {'mmcv_version': '1.4.8', 'epoch': 36, 'iter': 4, 'CLASSES': ('a',)},
        'state_dict': {'linear.weight': torch.ones(1, 2), 'linear.bias': torch.ones(1)},
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.01, 'params': [0, 1]}]},
    }
    torch.save(mmcv1, work_dir / 'iter_4.pth')
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_4.pth'))
    resumed = train_child(work_dir, max_iters=6, keep=2)
    assert resumed.returncode != 0
    assert 'cannot resume from this file: it has no message_hub' in resumed.stderr
    assert 'load_from' in resumed.stderr
    assert 'KeyError' not in resumed.stderr
    assert not (work_dir / 'iter_6.pth').exists()


# ----------------------------------------------------------------------------- choosing a file


def _complete(path, step):
    torch.save({'meta': {'iter': step}, 'state_dict': {'w': torch.zeros(1)}}, path)
    os.utime(path, ns=(step * 10**9, step * 10**9))  # written in step order


@pytest.mark.parametrize('pointer', [None, '', 'gone', 'truncated'])
def test_resume_takes_the_newest_complete_checkpoint(tmp_path, pointer):
    for step in (2, 4, 10):
        _complete(tmp_path / f'iter_{step}.pth', step)
    data = (tmp_path / 'iter_10.pth').read_bytes()
    (tmp_path / 'iter_12.pth').write_bytes(data[: len(data) // 2])  # cut short by a kill
    if pointer is not None:
        named = {'': '', 'gone': tmp_path / 'iter_99.pth', 'truncated': tmp_path / 'iter_12.pth'}
        (tmp_path / 'last_checkpoint').write_text(str(named[pointer]))
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')


def test_a_valid_pointer_to_the_newest_file_is_followed(tmp_path):
    _complete(tmp_path / 'iter_2.pth', 2)
    _complete(tmp_path / 'iter_10.pth', 10)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_10.pth'))
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')


def test_nothing_to_resume_is_a_fresh_start_and_only_broken_files_an_error(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None
    (tmp_path / 'iter_2.pth').write_bytes(b'')
    with pytest.raises(
        NatMMError, match=r'no complete checkpoint to resume from: .*iter_2\.pth is empty'
    ):
        find_resume_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- files


def test_partial_files_are_removed_and_nothing_else(tmp_path):
    for name in ('.iter_4.pth.partial', '.last_checkpoint.partial', 'iter_2.pth', 'notes.partial'):
        (tmp_path / name).write_bytes(b'x')
    assert sorted(os.path.basename(p) for p in remove_partial_files(str(tmp_path))) == [
        '.iter_4.pth.partial',
        '.last_checkpoint.partial',
    ]
    assert sorted(os.listdir(tmp_path)) == ['iter_2.pth', 'notes.partial']


def test_atomic_writes_keep_the_umask_mode_and_write_through_symlinks(tmp_path):
    from nat_mm.fileio import atomic_write_bytes

    previous = os.umask(0o022)
    try:
        atomic_write_bytes(b'new', tmp_path / 'plain')
        target = tmp_path / 'elsewhere' / 'target'
        target.parent.mkdir()
        target.write_bytes(b'old')
        (tmp_path / 'link').symlink_to(target)
        atomic_write_bytes(b'through', tmp_path / 'link')
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / 'plain').st_mode) == 0o644
    assert (tmp_path / 'link').is_symlink() and target.read_bytes() == b'through'
    assert sorted(os.listdir(tmp_path)) == ['elsewhere', 'link', 'plain']
    assert os.listdir(target.parent) == ['target']


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import nat_mm.fileio as writing
    from nat_mm.fileio import atomic_write_bytes

    target = tmp_path / 'iter_1.pth'
    target.write_bytes(b'old')

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(writing.os, 'fsync', crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(b'new content', target)
    assert target.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['iter_1.pth']
