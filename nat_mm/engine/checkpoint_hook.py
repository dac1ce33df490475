"""``CrashSafeCheckpointHook``: mmengine's CheckpointHook that never loses the last complete
checkpoint, whenever the run is killed.

mmengine 0.10 writes ``iter_N.pth`` in place, removes the oldest kept checkpoint *before* writing
the new one (so with ``max_keep_ckpts=1`` a kill during the save leaves none) and writes the
``last_checkpoint`` pointer in place. This hook, for local folders:

1. writes the checkpoint to ``.iter_N.pth.partial`` beside it, fsyncs it and renames it into
   place (a reader sees the old file or the new one, never a part of one);
2. then writes the pointer the same way;
3. only then removes the checkpoints beyond ``max_keep_ckpts``;
4. at the start of training removes ``*.partial`` files a kill left behind, and the checkpoints
   older than the kept ones whose removal a kill interrupted.

Files get the usual permissions (the umask) and symlinks are written through. Enable it in a
config with ``default_hooks = dict(checkpoint=dict(type='CrashSafeCheckpointHook', ...))``
(the same arguments as ``CheckpointHook``); nat_mm's configs and ``tools/train.py`` do.
"""

from __future__ import annotations

import os
import re

from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from nat_mm.engine.resume import POINTER_NAME
from nat_mm.fileio import PARTIAL_SUFFIX, atomic_write_bytes, partial_path, publish_file

_PARTIAL = re.compile(rf'\..+{re.escape(PARTIAL_SUFFIX)}')


def remove_partial_files(folder: str) -> list[str]:
    """Removes the ``.NAME.partial`` files in ``folder``; returns their paths."""
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _PARTIAL.fullmatch(name):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


@HOOKS.register_module()
class CrashSafeCheckpointHook(CheckpointHook):
    """:class:`mmengine.hooks.CheckpointHook` with atomic saves and late removal (module doc).

    Takes exactly ``CheckpointHook``'s arguments. Folders of other file backends (``out_dir``
    on a remote store) are saved as mmengine saves them.
    """

    def _is_local(self) -> bool:
        return isinstance(self.file_backend, LocalBackend)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if not (self._is_local() and is_main_process()):
            return
        for folder in {self.out_dir, runner.work_dir}:
            for path in remove_partial_files(folder):
                runner.logger.info(f'removed {path}, left by an interrupted save')
        for path in self._expired_checkpoints():
            os.remove(path)
            runner.logger.info(f'removed {path}: older than the kept checkpoints')

    def _expired_checkpoints(self) -> list[str]:
        """Checkpoints older than the oldest kept one (a kill came between save and removal)."""
        if self.max_keep_ckpts <= 0 or not self.keep_ckpt_ids or not os.path.isdir(self.out_dir):
            return []
        pattern = re.compile(re.escape(self.filename_tmpl).replace(re.escape('{}'), r'(\d+)'))
        return [
            os.path.join(self.out_dir, name)
            for name in sorted(os.listdir(self.out_dir))
            if (match := pattern.fullmatch(name)) and int(match[1]) < self.keep_ckpt_ids[0]
        ]

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        if not self._is_local():
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        expired = []
        # mmengine's bookkeeping of kept checkpoints, with the removal moved after the save.
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                expired.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        temporary = partial_path(os.path.realpath(self.last_ckpt))
        runner.save_checkpoint(
            os.path.dirname(temporary),
            os.path.basename(temporary),
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args,
        )
        if not is_main_process():
            return
        publish_file(temporary, self.last_ckpt)
        atomic_write_bytes(self.last_ckpt.encode(), os.path.join(runner.work_dir, POINTER_NAME))
        for old_step in expired:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if os.path.isfile(path):
                os.remove(path)
