"""Runner-side additions: crash-safe checkpoint saving and resuming."""

from .atomic_checkpoint import (
    atomic_write_bytes,
    find_latest_checkpoint,
    install_atomic_checkpointing,
    newest_checkpoint_in,
)

__all__ = [
    'atomic_write_bytes',
    'find_latest_checkpoint',
    'install_atomic_checkpointing',
    'newest_checkpoint_in',
]
