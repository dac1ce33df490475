"""nat_mm: Neighborhood Attention Transformers (NAT, DiNAT) for OpenMMLab 2.0.

Importing the package registers what it provides in mmengine's root registries, and does nothing
else: ``type='NAT'`` / ``'DiNAT'`` / ``'DiNATs'`` (MODELS), ``'NATOptimWrapperConstructor'``,
``'CrashSafeCheckpointHook'`` (HOOKS), ``'SafeLoadRunner'`` (RUNNERS), and the FLOP handle of
neighborhood attention in mmengine's analyzer. No loader, file backend or function of mmengine
or torch is replaced: what changes behaviour is a component a config or a tool switches on.
"""

from nat_mm import engine, models, optim  # noqa: F401  (registration happens at import)
from nat_mm.ops.flops import register_flop_handles

__version__ = '0.1.0'

register_flop_handles()
