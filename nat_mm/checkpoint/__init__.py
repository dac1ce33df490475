"""Checkpoints: reading them without running code, their layouts, strict loading, safe writing.

- :mod:`~nat_mm.checkpoint.reading`: :func:`load_checkpoint` (tensors-only by default) and the
  allowlist of its restricted unpickler;
- :mod:`~nat_mm.checkpoint.download`: URLs, cached and optionally hash-checked;
- :mod:`~nat_mm.checkpoint.layouts`: the original / mmdet / HuggingFace layouts and converters;
- :mod:`~nat_mm.checkpoint.model_layouts`: whole-model files (mmdet 2.x / mmseg 0.x, detectron2
  Mask2Former) brought to mmdet 3.x's / mmseg 1.x's layout and meta;
- :mod:`~nat_mm.checkpoint.strict`: loading into a model or a backbone, every bad key reported;
- :mod:`~nat_mm.checkpoint.writing`: saving and converting files (atomically, :mod:`nat_mm.fileio`).
"""

from nat_mm.checkpoint.download import download_checkpoint
from nat_mm.checkpoint.layouts import (
    FORMATS,
    detect_format,
    from_natmm,
    resize_rpb,
    to_natmm,
    unwrap_state_dict,
)
from nat_mm.checkpoint.model_layouts import (
    HOSTS,
    MODEL_FORMATS,
    convert_model_state_dict,
    dataset_meta_from,
    to_host_checkpoint,
)
from nat_mm.checkpoint.reading import (
    UnsafeCheckpointError,
    allowed_global_names,
    load_checkpoint,
)
from nat_mm.checkpoint.strict import (
    KeyReport,
    compare_state_dicts,
    load_backbone_checkpoint,
    load_model_checkpoint,
    load_model_state,
    load_state_dict_strictly,
)
from nat_mm.checkpoint.writing import convert_checkpoint_file, save_checkpoint_file

__all__ = [
    'FORMATS',
    'HOSTS',
    'MODEL_FORMATS',
    'KeyReport',
    'UnsafeCheckpointError',
    'allowed_global_names',
    'compare_state_dicts',
    'convert_checkpoint_file',
    'convert_model_state_dict',
    'dataset_meta_from',
    'detect_format',
    'download_checkpoint',
    'from_natmm',
    'load_backbone_checkpoint',
    'load_checkpoint',
    'load_model_checkpoint',
    'load_model_state',
    'load_state_dict_strictly',
    'resize_rpb',
    'save_checkpoint_file',
    'to_host_checkpoint',
    'to_natmm',
    'unwrap_state_dict',
]
