"""No nat_mm path runs code from a checkpoint file unless the user says the file is trusted.

Every entry point gets a ``.pth`` whose unpickling would create a marker file (the conftest's
``write_payload``): the marker must never appear, the tool exits 2 and names the opt-in. With the
opt-in, a benign pickle outside the allowlist (a ``collections.deque``) loads.
"""

from __future__ import annotations

import collections
import pathlib
import pickle

import pytest
import torch
from packaging.version import Version

from nat_mm.apis.main_job import det_overrides
from nat_mm.checkpoint import UnsafeCheckpointError, allowed_global_names, load_checkpoint
from nat_mm.models import NAT

TINY = dict(
    arch=None,
    embed_dim=8,
    depths=(1, 1),
    num_heads=(1, 2),
    mlp_ratio=1.0,
    kernel_size=3,
    out_indices=(0, 1),
)


def tiny_state_dict() -> dict:
    return NAT(**TINY, init_cfg=None).state_dict()


def assert_refused(message: str, path: str) -> None:
    assert 'refusing to unpickle the checkpoint' in message
    assert 'needs the global' in message and path in message
    assert '--trust-checkpoint' in message and 'trust=True' in message


# ----------------------------------------------------------------------------- the loader itself


def test_the_loader_refuses_a_payload_before_building_it(write_payload):
    path, marker = write_payload({'state_dict': tiny_state_dict()})
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert_refused(str(info.value), path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_trust_loads_a_benign_pickle_the_allowlist_refuses(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'state_dict': tiny_state_dict(), 'history': collections.deque([1, 2])}, path)
    with pytest.raises(UnsafeCheckpointError, match=r'collections\.deque'):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)['history'] == collections.deque([1, 2])


def test_getattr_is_allowed_only_for_history_buffer_statistics(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (getattr, (collections.OrderedDict, 'fromkeys'))  # on an allowed class

    torch.save({'x': Sneaky()}, tmp_path / 'getattr.pth')
    with pytest.raises(UnsafeCheckpointError, match='refusing getattr'):
        load_checkpoint(tmp_path / 'getattr.pth')
    assert 'builtins.getattr' in allowed_global_names()
    assert not any(
        name.startswith(('os.', 'posix.', 'subprocess.')) for name in allowed_global_names()
    )


@pytest.mark.skipif(
    Version(torch.__version__) < Version('2.6'),
    reason="torch < 2.6 unpickles anything in mmengine's own loader; nat_mm does not patch it",
)
def test_mmengine_loading_after_import_still_refuses(write_payload):
    from mmengine.runner.checkpoint import _load_checkpoint

    import nat_mm  # noqa: F401

    path, marker = write_payload({'state_dict': tiny_state_dict()})
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- backbone init_cfg


@pytest.mark.parametrize('where', ['file', 'url'])
def test_backbone_init_cfg_refuses_a_payload(where, write_payload, http_root):
    path, marker = write_payload({'state_dict': tiny_state_dict()})
    source = path
    if where == 'url':
        root, base_url = http_root
        (root / 'payload.pth').write_bytes(pathlib.Path(path).read_bytes())
        source = f'{base_url}/payload.pth'
    backbone = NAT(**TINY, init_cfg=dict(type='Pretrained', checkpoint=source))
    with pytest.raises(UnsafeCheckpointError) as info:
        backbone.init_weights()
    assert '--trust-checkpoint' in str(info.value) and source in str(info.value)
    assert not marker.exists()


def test_backbone_init_cfg_with_trust_loads_a_benign_pickle(tmp_path):
    weights = tiny_state_dict()
    torch.save({'state_dict': weights, 'extra': collections.deque([1])}, tmp_path / 'legacy.pth')
    backbone = NAT(
        **TINY,
        init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'legacy.pth'), trust=True),
    )
    backbone.init_weights()
    assert torch.equal(
        backbone.state_dict()['levels.0.blocks.0.attn.rpb'], weights['levels.0.blocks.0.attn.rpb']
    )


# ----------------------------------------------------------------------------- tools


@pytest.fixture(scope='module')
def detector_weights(det_demo_config) -> dict:
    from nat_mm.apis import build_model, load_config

    return build_model(load_config(det_demo_config)).state_dict()


def test_convert_checkpoint_refuses_a_payload(write_payload, tmp_path, run_cli):
    path, marker = write_payload({'state_dict': tiny_state_dict()})
    result = run_cli('convert_checkpoint', path, tmp_path / 'out.pth', '--to', 'original')
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: ') and 'Traceback' not in result.stderr
    assert_refused(result.stderr, path)
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()


def test_convert_checkpoint_with_trust_converts_a_benign_pickle(tmp_path, call_tool):
    torch.save({'model': tiny_state_dict(), 'extra': collections.deque()}, tmp_path / 'old.pth')
    out = tmp_path / 'new.pth'
    assert call_tool('convert_checkpoint', [tmp_path / 'old.pth', out, '--to', 'original']) == 2
    argv = [tmp_path / 'old.pth', out, '--to', 'original', '--trust-checkpoint']
    assert call_tool('convert_checkpoint', argv) == 0
    assert sorted(torch.load(out, weights_only=True)) == sorted(tiny_state_dict())


def test_test_tool_refuses_a_payload(
    write_payload, detector_weights, det_demo_config, demo_data, tmp_path, call_tool, capsys
):
    path, marker = write_payload({'state_dict': detector_weights, 'meta': {}})
    status = call_tool(
        'test',
        [
            det_demo_config,
            path,
            '--work-dir',
            tmp_path / 'test',
            '--cfg-options',
            *det_overrides(demo_data, None),
        ],
    )
    assert status == 2
    assert_refused(capsys.readouterr().err, path)
    assert not marker.exists()


def test_demo_tool_refuses_a_payload(
    write_payload, detector_weights, det_demo_config, demo_data, tmp_path, call_tool, capsys
):
    path, marker = write_payload({'state_dict': detector_weights, 'meta': {}})
    images = f'{demo_data}/coco/val2017'
    status = call_tool('demo', [det_demo_config, path, images, '--out-dir', tmp_path / 'pictures'])
    assert status == 2
    assert_refused(capsys.readouterr().err, path)
    assert not marker.exists() and not (tmp_path / 'pictures').exists()


@pytest.mark.parametrize('how', ['resume', 'load_from'])
def test_train_tool_refuses_a_payload(
    how, write_payload, detector_weights, det_demo_config, demo_data, tmp_path, call_tool, capsys
):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    path, marker = write_payload(
        {'state_dict': detector_weights, 'meta': {'iter': 2, 'epoch': 0}}, 'iter_2.pth'
    )
    options = ['--cfg-options', *det_overrides(demo_data, 4), 'train_dataloader.batch_size=2']
    if how == 'resume':  # planted as the latest checkpoint of the work dir
        (work_dir / 'iter_2.pth').write_bytes(pathlib.Path(path).read_bytes())
        (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))
        argv = [det_demo_config, '--work-dir', work_dir, '--resume', *options]
    else:
        argv = [det_demo_config, '--work-dir', work_dir, *options, f'load_from={path}']
    assert call_tool('train', argv) == 2
    assert_refused(capsys.readouterr().err, 'iter_2.pth')
    assert not marker.exists()
    assert not (work_dir / 'iter_4.pth').exists()
