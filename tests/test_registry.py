"""`type='NAT'` / `type='DiNAT'` build from mmdet's, mmseg's and mmpretrain's registries."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import nat_mm.models  # noqa: F401  (registers NAT and DiNAT in mmengine's root MODELS)
from nat_mm.models import NAT, DiNAT

SMALL = dict(arch=None, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), mlp_ratio=1.0)


def downstream_registry(package: str):
    """The MODELS registry of ``package``, or a visible skip when it is not installed.

    Building from a registry imports ``{package}.models`` (the registry's location). mmpretrain's
    package import needs torchvision, which has no build for a CPU-only torch wheel; then its real
    ``registry.py`` (which imports only mmengine) is loaded from the installed file: the registry
    and its parent chain are exactly the ones mmpretrain configs use; only the import of its own
    models (the registry's location) is marked done, since that is what needs torchvision.
    """
    try:
        importlib.import_module(f'{package}.models')
        return importlib.import_module(f'{package}.registry').MODELS
    except ImportError as error:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f'{package} is not installed: {error}')
        module = sys.modules.get(f'{package}.registry')  # left by the failed package import
        if module is None:
            path = Path(spec.submodule_search_locations[0]) / 'registry.py'
            module_spec = importlib.util.spec_from_file_location(f'_{package}_registry', path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        module.MODELS._imported = True
        return module.MODELS


@pytest.mark.parametrize('package', ['mmdet', 'mmseg', 'mmpretrain'])
@pytest.mark.parametrize(('type_name', 'cls'), [('NAT', NAT), ('DiNAT', DiNAT)])
def test_build_from_downstream_registry(package, type_name, cls):
    registry = downstream_registry(package)
    dilations = [[2], [1], [1, 2], [1]] if cls is DiNAT else None
    model = registry.build(dict(type=type_name, **SMALL, kernel_size=3, dilations=dilations))
    assert type(model) is cls
    assert model.out_channels == (16, 32, 64, 128)


@pytest.mark.parametrize('package', ['mmdet', 'mmseg'])
def test_outputs_feed_an_fpn_neck(package):
    from mmengine.registry import DefaultScope

    registry = downstream_registry(package)
    # The library's scope, whatever an earlier test left as the current default scope.
    with DefaultScope.overwrite_default_scope(package):
        backbone = registry.build(dict(type='NAT', **SMALL, kernel_size=3, out_indices=(1, 2, 3)))
        neck = registry.build(
            dict(type='FPN', in_channels=list(backbone.out_channels), out_channels=8, num_outs=3)
        )
    with torch.no_grad():
        features = neck(list(backbone.eval()(torch.randn(1, 3, 64, 48))))
    assert [tuple(f.shape) for f in features] == [(1, 8, 8, 6), (1, 8, 4, 3), (1, 8, 2, 2)]
