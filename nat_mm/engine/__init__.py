"""Components a config switches on by name: crash-safe checkpoint saving and safe loading.

``runner_type = 'SafeLoadRunner'`` and
``default_hooks = dict(checkpoint=dict(type='CrashSafeCheckpointHook', ...))``; registering them
in mmengine's root registries is all that importing this module does.
"""

from nat_mm.engine.checkpoint_hook import CrashSafeCheckpointHook, remove_partial_files
from nat_mm.engine.resume import checkpoint_problem, find_resume_checkpoint
from nat_mm.engine.runner import SafeLoadRunner

__all__ = [
    'CrashSafeCheckpointHook',
    'SafeLoadRunner',
    'checkpoint_problem',
    'find_resume_checkpoint',
    'remove_partial_files',
]
