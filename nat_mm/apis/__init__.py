"""nat_mm's package API, which the command-line tools (``nat_mm.tools``) are thin front ends of.

- configs and models: :func:`load_config`, :func:`build_model`, :func:`build_backbone`,
  :func:`backbone_presets`;
- runs: :func:`build_train_runner`, :func:`build_test_runner`, :func:`run_test`,
  :func:`use_nat_mm_runtime`; dataset checks and demo data: :func:`check_dataset_files`,
  :func:`generate_demo_data`; the main job: :func:`run_main_job`;
- inference: :func:`init_inferencer` (mmdet's DetInferencer / mmseg's MMSegInferencer),
  :func:`paint_predictions`;
- deployment: :func:`build_network` and :func:`export_and_check` (ONNX / ExportedProgram, checked
  against eager PyTorch).

Checkpoints (safe loading, strict checks, downloads, conversion) are in :mod:`nat_mm.checkpoint`;
every bad input raises :class:`nat_mm.errors.NatMMError`.
"""

from nat_mm.apis.config import (
    backbone_presets,
    build_backbone,
    build_model,
    library_of,
    load_config,
    register_library,
)
from nat_mm.apis.datasets import check_dataset_files, generate_demo_data
from nat_mm.apis.export import build_network, export_and_check
from nat_mm.apis.inference import init_inferencer, list_images, paint_predictions
from nat_mm.apis.main_job import MainJobSettings, run_main_job
from nat_mm.apis.runners import (
    build_test_runner,
    build_train_runner,
    run_test,
    use_nat_mm_runtime,
)

__all__ = [
    'MainJobSettings',
    'backbone_presets',
    'build_backbone',
    'build_model',
    'build_network',
    'build_test_runner',
    'build_train_runner',
    'check_dataset_files',
    'export_and_check',
    'generate_demo_data',
    'init_inferencer',
    'library_of',
    'list_images',
    'load_config',
    'paint_predictions',
    'register_library',
    'run_main_job',
    'run_test',
    'use_nat_mm_runtime',
]
