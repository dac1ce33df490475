"""Checkpoints by URL: downloaded once (rank 0 first under torchrun), hash-named, hash-checked;
the test and demo tools take URLs; the tools are installed as console scripts."""

from __future__ import annotations

import functools
import http.server
import importlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from nat_mm.apis import build_model, load_config
from nat_mm.apis.main_job import det_overrides
from nat_mm.checkpoint import download, download_checkpoint, load_checkpoint
from nat_mm.checkpoint.download import cached_download_path, file_sha256
from nat_mm.errors import NatMMError


@pytest.fixture
def counting_server(tmp_path, monkeypatch):
    """Serves tmp_path/'www' and counts the GET requests per path."""
    root = tmp_path / 'www'
    root.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    requests: dict[str, int] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests[self.path] = requests.get(self.path, 0) + 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}', requests
    server.shutdown()
    server.server_close()


def test_a_url_is_downloaded_once_under_a_hashed_name(counting_server):
    root, base, requests = counting_server
    for folder in ('a', 'b'):
        (root / folder).mkdir()
        torch.save({'w': torch.full((2,), float(ord(folder)))}, root / folder / 'model.pth')
    first = download_checkpoint(f'{base}/a/model.pth')
    assert download_checkpoint(f'{base}/a/model.pth') == first
    second = download_checkpoint(f'{base}/b/model.pth')
    assert first != second and os.path.basename(first).endswith('-model.pth')
    assert requests == {'/a/model.pth': 1, '/b/model.pth': 1}
    assert load_checkpoint(f'{base}/b/model.pth')['w'][0] == ord('b')
    assert not [name for name in os.listdir(os.path.dirname(first)) if name.startswith('.')]


def test_sha256_is_checked_and_a_bad_download_removed(counting_server, tmp_path):
    root, base, _ = counting_server
    torch.save({'w': torch.zeros(2)}, root / 'x.pth')
    digest = file_sha256(str(root / 'x.pth'))
    assert load_checkpoint(f'{base}/x.pth', sha256=digest[:12])['w'].shape == (2,)
    with pytest.raises(
        NatMMError, match=f'has SHA-256 {digest}, expected 0000000000; the download was removed'
    ):
        download_checkpoint(f'{base}/x.pth', sha256='0000000000')
    assert not os.path.exists(cached_download_path(f'{base}/x.pth'))
    with pytest.raises(NatMMError, match='sha256 must be 8 to 64 hex digits'):
        load_checkpoint(root / 'x.pth', sha256='xyz')
    with pytest.raises(NatMMError, match='expected 00000000'):
        load_checkpoint(root / 'x.pth', sha256='00000000')  # local files are checked too


def test_a_short_sha256_prefix_warns_once_per_check(tmp_path, monkeypatch):
    path = tmp_path / 'x.pth'
    torch.save({'w': torch.zeros(2)}, path)
    digest = file_sha256(str(path))
    log = []
    monkeypatch.setattr(
        download,
        'print_log',
        lambda message, logger, level=logging.INFO: log.append((level, message)),
    )
    for digits, warnings in ((8, 1), (15, 1), (16, 0), (64, 0)):
        log.clear()
        assert load_checkpoint(path, sha256=digest[:digits])['w'].shape == (2,)
        assert [level for level, _ in log] == [logging.WARNING] * warnings, digits
    log.clear()
    with pytest.raises(NatMMError, match='expected 00000000'):
        load_checkpoint(path, sha256='00000000')
    ((level, message),) = log  # a mismatch warns too: the prefix was too short either way
    assert level == logging.WARNING and 'integrity' in message and 'all 64 digits' in message
    assert str(path) in message


def test_a_failed_download_is_an_error_naming_the_url(counting_server):
    _, base, _ = counting_server
    with pytest.raises(NatMMError, match=r'cannot download the checkpoint: .*404.*\(http://127'):
        download_checkpoint(f'{base}/missing.pth')


DOWNLOAD_CHILD = textwrap.dedent("""
    import sys, torch.distributed as dist
    from nat_mm.checkpoint import download_checkpoint
    rank, port, url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    print(download_checkpoint(url))
    dist.destroy_process_group()
""")


def test_under_a_process_group_rank_0_downloads_and_the_others_wait(counting_server):
    import socket

    root, base, requests = counting_server
    torch.save({'w': torch.zeros(3)}, root / 'shared.pth')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    children = [
        subprocess.Popen(
            [sys.executable, '-c', DOWNLOAD_CHILD, str(rank), str(port), f'{base}/shared.pth'],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        for rank in (0, 1)
    ]
    outputs = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), outputs
    paths = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert paths[0] == paths[1]  # the same cached file
    assert requests == {'/shared.pth': 1}


# ----------------------------------------------------------------------------- tools and URLs


@pytest.fixture
def detector_url(counting_server, det_demo_config):
    root, base, requests = counting_server
    model = build_model(load_config(det_demo_config))
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, root / 'det.pth')
    return f'{base}/det.pth', file_sha256(str(root / 'det.pth')), requests


def test_the_test_tool_evaluates_a_url_checkpoint(
    detector_url, call_tool, demo_data, det_demo_config, tmp_path
):
    url, digest, requests = detector_url
    metrics = tmp_path / 'metrics.json'
    argv = [
        det_demo_config,
        url,
        '--work-dir',
        tmp_path / 'test',
        '--metrics-json',
        metrics,
        '--sha256',
        digest,
        '--cfg-options',
        *det_overrides(demo_data, None),
    ]
    assert call_tool('test', argv) == 0
    assert 'coco/bbox_mAP' in json.loads(metrics.read_text())
    assert requests == {'/det.pth': 1}


def test_the_demo_tool_paints_with_a_url_checkpoint(
    detector_url, call_tool, capsys, demo_data, det_demo_config, tmp_path
):
    url, digest, _ = detector_url
    images = f'{demo_data}/coco/val2017'
    argv = [det_demo_config, url, images, '--out-dir', tmp_path / 'out', '--limit', 1]
    assert call_tool('demo', [*argv, '--sha256', '00000000']) == 2
    assert 'expected 00000000' in capsys.readouterr().err
    assert call_tool('demo', [*argv, '--sha256', digest]) == 0
    assert len(os.listdir(tmp_path / 'out')) == 1


def test_every_tool_is_a_console_script():
    scripts = {
        entry.name: entry.value
        for entry in importlib.metadata.entry_points(group='console_scripts')
        if entry.name.startswith('nat-mm-')
    }
    tools = sorted(
        name[:-3]
        for name in os.listdir(os.path.dirname(importlib.import_module('nat_mm.tools').__file__))
        if name.endswith('.py') and name not in ('__init__.py', 'cli.py')
    )
    assert sorted(scripts) == sorted(f'nat-mm-{tool.replace("_", "-")}' for tool in tools)
    for tool in tools:
        assert scripts[f'nat-mm-{tool.replace("_", "-")}'] == f'nat_mm.tools.{tool}:main'
        assert callable(importlib.import_module(f'nat_mm.tools.{tool}').main)
