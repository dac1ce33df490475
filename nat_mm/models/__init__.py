"""NAT / DiNAT backbones (registered in mmengine's root ``MODELS``) and their checkpoint formats."""

from nat_mm.models.checkpoint import (
    FORMATS,
    convert_checkpoint,
    detect_format,
    from_natmm,
    load_backbone_checkpoint,
    read_checkpoint,
    resize_rpb,
    save_checkpoint_file,
    to_natmm,
    unwrap_state_dict,
)
from nat_mm.models.dilations import DILATION_SCHEDULES, resolve_dilations
from nat_mm.models.nat import DINAT_ARCHS, NAT, NAT_ARCHS, ArchSpec, DiNAT

__all__ = [
    'DILATION_SCHEDULES',
    'DINAT_ARCHS',
    'FORMATS',
    'NAT',
    'NAT_ARCHS',
    'ArchSpec',
    'DiNAT',
    'convert_checkpoint',
    'detect_format',
    'from_natmm',
    'load_backbone_checkpoint',
    'read_checkpoint',
    'resize_rpb',
    'resolve_dilations',
    'save_checkpoint_file',
    'to_natmm',
    'unwrap_state_dict',
]
