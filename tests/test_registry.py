"""`type='NAT'` / `type='DiNAT'` build from mmdet's, mmseg's and mmpretrain's registries."""

import importlib

import pytest
import torch

import nat_mm.models  # noqa: F401  (registers NAT and DiNAT in mmengine's root MODELS)
from nat_mm.models import NAT, DiNAT

SMALL = dict(arch=None, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), mlp_ratio=1.0)


def downstream_registry(package: str):
    """The MODELS registry of ``package``, or a skip naming the import error.

    Building from a registry imports ``{package}.models`` (the registry's location), so that must
    import for real: mmpretrain's needs torchvision, which the CPU-only torch stack of `make setup`
    lacks, and then its registration is untested, visibly.
    """
    try:
        importlib.import_module(f'{package}.models')
        return importlib.import_module(f'{package}.registry').MODELS
    except ImportError as error:
        pytest.skip(f'{package}.models does not import: {type(error).__name__}: {error}')


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
