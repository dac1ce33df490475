"""Crash-safe checkpoint writing and resume-pointer fallback (nat_mm.engine)."""

import os

import pytest
import torch
from mmengine.fileio.backends.local_backend import LocalBackend
from mmengine.runner.checkpoint import save_checkpoint

import nat_mm.engine.atomic_checkpoint as atomic
from nat_mm.engine import find_latest_checkpoint, install_atomic_checkpointing


@pytest.fixture(autouse=True)
def _installed():
    install_atomic_checkpointing()


def test_save_checkpoint_writes_through_a_temporary_file(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        atomic.os, 'replace', lambda a, b: (replaced.append((a, b)), real_replace(a, b))
    )
    target = tmp_path / 'iter_3.pth'
    save_checkpoint({'state_dict': {'w': torch.arange(4)}}, str(target))
    assert len(replaced) == 1 and replaced[0][1] == str(target)
    assert os.path.dirname(replaced[0][0]) == str(tmp_path)
    assert torch.equal(torch.load(target)['state_dict']['w'], torch.arange(4))
    assert os.listdir(tmp_path) == ['iter_3.pth']


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / 'iter_1.pth'
    target.write_bytes(b'old')

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, 'fsync', crash)
    with pytest.raises(KeyboardInterrupt):
        LocalBackend().put(b'new content', target)
    assert target.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['iter_1.pth']


def test_put_text_is_atomic_too(tmp_path):
    LocalBackend().put_text('hello', tmp_path / 'sub' / 'a.txt')
    assert (tmp_path / 'sub' / 'a.txt').read_text() == 'hello'


@pytest.mark.parametrize('pointer', [None, '', 'gone'])
def test_resume_falls_back_to_newest_complete_checkpoint(tmp_path, pointer):
    for step in (2, 10, 4):
        (tmp_path / f'iter_{step}.pth').write_bytes(b'x')
    (tmp_path / '.iter_12.pth.abc').write_bytes(b'partial')
    if pointer is not None:
        value = str(tmp_path / 'iter_99.pth') if pointer == 'gone' else ''
        (tmp_path / 'last_checkpoint').write_text(value)
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')


def test_valid_pointer_wins(tmp_path):
    for step in (2, 10):
        (tmp_path / f'iter_{step}.pth').write_bytes(b'x')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')


def test_no_checkpoint_means_no_resume(tmp_path):
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_runner_uses_the_patched_finder():
    import mmengine.runner.runner as runner_module

    assert runner_module.find_latest_checkpoint is find_latest_checkpoint
