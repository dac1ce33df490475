"""nat_mm: Neighborhood Attention Transformers (NAT, DiNAT) for OpenMMLab 2.0.

Importing the package registers everything it provides (``type='NAT'`` / ``type='DiNAT'`` in
mmdet, mmseg and mmpretrain configs) and applies the fixes of :mod:`nat_mm.compat`.
"""

from nat_mm import compat

__version__ = '0.1.0'

compat.apply()
