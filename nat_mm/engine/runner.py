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

from numbers import Integral

from mmengine.hooks import CheckpointHook
from mmengine.logging import MessageHub
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from nat_mm.checkpoint import load_checkpoint, load_model_state
from nat_mm.engine.resume import checkpoint_folders, find_resume_checkpoint
from nat_mm.errors import NatMMError

# What mmengine's Runner.resume reads from a checkpoint besides the weights (and the optimizer
# and schedulers, which it skips where absent): meta's counters, MessageHub.load_state_dict's keys.
_RESUME_META = ('epoch', 'iter')
_HUB_STATE = ('log_scalars', 'runtime_info', 'resumed_keys')


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

    def resume(
        self,
        filename: str,
        resume_optimizer: bool = True,
        resume_param_scheduler: bool = True,
        map_location: object = 'default',
    ) -> None:
        """As mmengine's; a file that is not an mmengine training checkpoint (mmcv 1.x,
        detectron2, weights only) is refused before anything is loaded."""
        self._resuming = True
        try:
            super().resume(filename, resume_optimizer, resume_param_scheduler, map_location)
        finally:
            self._resuming = False

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
        if getattr(self, '_resuming', False):
            _check_resumable(checkpoint, filename)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        load_model_state(self.model, checkpoint, filename)  # other layouts converted, logged
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint


def _check_resumable(checkpoint: object, filename: str) -> None:
    """Raises unless ``checkpoint`` holds the training state mmengine's resume reads after the
    weights: ``meta`` with int ``epoch`` / ``iter`` and the message hub's state (anything less
    failed there with a KeyError / AssertionError, or trained on from ``iter = '4'``)."""
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    meta, hub = checkpoint.get('meta'), checkpoint.get('message_hub')
    missing = []
    if not isinstance(meta, dict):
        missing.append('meta')
    else:
        missing += [
            f'meta.{key} (an int)'
            for key in _RESUME_META
            if not isinstance(meta.get(key), Integral) or isinstance(meta.get(key), bool)
        ]
    if not isinstance(hub, MessageHub) and not (
        isinstance(hub, dict) and all(isinstance(hub.get(key), dict) for key in _HUB_STATE)
    ):
        missing.append(f'message_hub (a dict of {", ".join(_HUB_STATE)})')
    if missing:
        raise NatMMError(
            f'cannot resume from this file: it has no {" / ".join(missing)} (not an mmengine '
            'training checkpoint, e.g. an mmcv 1.x, detectron2 or weights-only file); start a new '
            'run from its weights with load_from (tools/train.py --cfg-options load_from=FILE)',
            filename,
        )
