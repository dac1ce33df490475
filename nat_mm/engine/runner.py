"""``SafeLoadRunner``: mmengine's Runner whose ``load_from`` and ``resume`` never run code from a
checkpoint file, load strictly, and resume from the newest complete checkpoint.

mmengine 0.10 reads checkpoints with a bare ``torch.load``: on torch < 2.6 that unpickles
anything (a file can run code), on torch >= 2.6 it refuses the runner's own checkpoints
(``HistoryBuffer``, numpy values). This runner reads them with
:func:`nat_mm.checkpoint.load_checkpoint` (tensors plus a short named allowlist, the same on
every torch), checks every key, shape and value against the model (:mod:`nat_mm.checkpoint.strict`),
and, for ``resume=True`` without a file, picks the checkpoint with
:func:`nat_mm.engine.resume.find_resume_checkpoint`.

Enable it with ``runner_type = 'SafeLoadRunner'`` in a config (nat_mm's configs and tools do);
``trust_checkpoint = True`` in the config allows full unpickling for files you trust, and
``load_from_sha256 = '...'`` checks the hash of the ``load_from`` file.
"""

from __future__ import annotations

from mmengine.hooks import CheckpointHook
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from nat_mm.checkpoint import load_checkpoint, load_state_dict_strictly, unwrap_state_dict
from nat_mm.engine.resume import checkpoint_folders, find_resume_checkpoint


@RUNNERS.register_module()
class SafeLoadRunner(Runner):
    """:class:`mmengine.runner.Runner` with nat_mm's checkpoint loading (module docstring).

    Takes exactly the Runner's arguments; reads ``trust_checkpoint`` from its config.
    """

    def load_or_resume(self) -> None:
        """As mmengine's, with the automatic resume of :func:`find_resume_checkpoint`."""
        if not self._has_loaded and self._resume and self._load_from is None:
            out_dirs = [hook.out_dir for hook in self.hooks if isinstance(hook, CheckpointHook)]
            folders = checkpoint_folders(self.work_dir, out_dirs)
            found = find_resume_checkpoint(self.work_dir, folders)
            if found is None:
                self._resume = False  # nothing to resume: a fresh start, already logged
            else:
                self._load_from = found
                self.logger.info(f'Auto resumed from the latest checkpoint {found}.')
        super().load_or_resume()

    def load_checkpoint(
        self,
        filename: str,
        map_location: str = 'cpu',
        strict: bool = True,
        revise_keys: object = None,
    ) -> dict:
        """Reads ``filename`` safely and loads its weights strictly into the model.

        ``strict`` and ``revise_keys`` are accepted for compatibility and ignored: loading is
        always strict, and ``module.`` prefixes are always removed.

        Raises:
            NatMMError: Unreadable or unsafe file, or weights that do not fit (every key listed).
        """
        sha256 = self.cfg.get('load_from_sha256') if filename == self._load_from else None
        trust = bool(self.cfg.get('trust_checkpoint', False))
        checkpoint = load_checkpoint(
            filename, map_location=map_location, trust=trust, sha256=sha256
        )
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        load_state_dict_strictly(self.model, unwrap_state_dict(checkpoint, filename), filename)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
