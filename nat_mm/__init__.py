"""nat_mm: Neighborhood Attention Transformers (NAT, DiNAT) for OpenMMLab 2.0.

Importing the package registers everything it provides in mmengine's root registries, so mmdet,
mmseg and mmpretrain configs build ``type='NAT'`` / ``type='DiNAT'`` and
``type='NATOptimWrapperConstructor'``; it also makes mmengine's FLOP counter see neighborhood
attention, writes checkpoints atomically and applies the fixes of :mod:`nat_mm.compat`.
"""

from nat_mm import compat, models, ops, optim  # noqa: F401  (registration happens at import)
from nat_mm.engine import install_atomic_checkpointing
from nat_mm.ops.flops import register_flop_handles

__version__ = '0.1.0'

compat.apply()
register_flop_handles()
install_atomic_checkpointing()
