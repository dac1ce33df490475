"""NAT / DiNAT backbones (registered in mmengine's root ``MODELS``); their checkpoint layouts are
in :mod:`nat_mm.checkpoint`."""

from nat_mm.models.dilations import DILATION_SCHEDULES, DINATS_DILATION_SCHEDULES, resolve_dilations
from nat_mm.models.dinats import DINATS_ARCHS, DiNATs
from nat_mm.models.nat import DINAT_ARCHS, NAT, NAT_ARCHS, ArchSpec, DiNAT

__all__ = [
    'DILATION_SCHEDULES',
    'DINATS_ARCHS',
    'DINATS_DILATION_SCHEDULES',
    'DINAT_ARCHS',
    'NAT',
    'NAT_ARCHS',
    'ArchSpec',
    'DiNAT',
    'DiNATs',
    'resolve_dilations',
]
