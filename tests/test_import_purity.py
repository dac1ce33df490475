"""``import nat_mm`` registers its components and changes nothing else of mmengine or torch."""

import json
import subprocess
import sys
import textwrap

SNAPSHOT = textwrap.dedent("""
    import json, os, stat, sys, tempfile
    import torch, torch.serialization
    import mmengine.runner.checkpoint as checkpoint_module
    import mmengine.runner.runner as runner_module
    from mmengine.fileio.backends.local_backend import LocalBackend
    from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, RUNNERS
    from mmengine.runner.checkpoint import CheckpointLoader

    def name(function):
        return f'{function.__module__}.{function.__qualname__}'

    def snapshot():
        folder = tempfile.mkdtemp()
        LocalBackend().put(b'x', os.path.join(folder, 'put'))
        LocalBackend().put_text('x', os.path.join(folder, 'put_text'))
        target = os.path.join(folder, 'target')
        open(target, 'w').close()
        os.symlink(target, os.path.join(folder, 'link'))
        LocalBackend().put(b'y', os.path.join(folder, 'link'))
        return {
            'loaders': {prefix: name(f) for prefix, f in CheckpointLoader._schemes.items()},
            'put': name(LocalBackend.put),
            'put_text': name(LocalBackend.put_text),
            'find_latest (checkpoint)': name(checkpoint_module.find_latest_checkpoint),
            'find_latest (runner)': name(runner_module.find_latest_checkpoint),
            'load_checkpoint (runner)': name(runner_module.Runner.load_checkpoint),
            'torch.load': name(torch.load),
            'safe globals': sorted(map(str, torch.serialization.get_safe_globals())),
            'mode put': oct(stat.S_IMODE(os.stat(os.path.join(folder, 'put')).st_mode)),
            'mode put_text': oct(stat.S_IMODE(os.stat(os.path.join(folder, 'put_text')).st_mode)),
            'symlink kept': os.path.islink(os.path.join(folder, 'link')),
            'NAT registered': 'NAT' in MODELS.module_dict,
        }

    before = snapshot()
    import nat_mm  # noqa: F401
    after = snapshot()
    print(json.dumps({'before': before, 'after': after,
                      'registered': {'MODELS': sorted(set(MODELS.module_dict) & {'NAT', 'DiNAT'}),
                                     'HOOKS': 'CrashSafeCheckpointHook' in HOOKS.module_dict,
                                     'RUNNERS': 'SafeLoadRunner' in RUNNERS.module_dict,
                                     'OPTIM': 'NATOptimWrapperConstructor'
                                     in OPTIM_WRAPPER_CONSTRUCTORS.module_dict}}))
""")


def test_import_changes_nothing_but_the_registries():
    # A fresh interpreter: in this one, nat_mm is imported already.
    result = subprocess.run(
        [sys.executable, '-c', SNAPSHOT], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    before, after = report['before'], report['after']
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert changed == {'NAT registered': (False, True)}
    assert report['registered'] == {
        'MODELS': ['DiNAT', 'NAT'],
        'HOOKS': True,
        'RUNNERS': True,
        'OPTIM': True,
    }


def test_import_registers_the_flop_handle_of_na2d_only():
    from mmengine.analysis import complexity_analysis

    import nat_mm  # noqa: F401
    from nat_mm.ops.flops import OP_NAME

    assert OP_NAME in complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS
