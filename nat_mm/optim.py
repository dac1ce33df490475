"""Optimizer-wrapper constructor carrying NAT's "no weight decay on norms and ``rpb``" rule.

mmengine's ``DefaultOptimWrapperConstructor`` matches ``paramwise_cfg.custom_keys`` as substrings,
longest key first, and applies ``norm_decay_mult`` only to parameters no key matched. A recipe that
gives the whole backbone an lr multiplier (``custom_keys={'backbone': dict(lr_mult=0.1)}``, as
Mask2Former does) therefore also gives every backbone norm and relative-position-bias table weight
decay, unless every such parameter is listed by name (the Swin configs of mmdet list each block).
This constructor applies the rule by module type and parameter name instead, after the default
grouping, so it holds for any NAT / DiNAT arch and any head without listing names.

``paramwise_cfg=dict(rpb_decay_mult=1.0)`` keeps the decay of ``rpb`` (norms still get none): the
Mask2Former recipe (detectron2's optimizer) exempts only norms, embeddings and Swin's bias tables,
so NAT's ``rpb`` trains with the full weight decay there.
"""

from __future__ import annotations

import torch.nn as nn
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

NORM_LAYER_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
RPB_PARAMETER_NAME = 'rpb'


def norm_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter owned directly by a normalization layer of ``model``."""
    return {
        id(param)
        for module in model.modules()
        if isinstance(module, NORM_LAYER_TYPES)
        for param in module.parameters(recurse=False)
    }


def rpb_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter whose own name is ``rpb`` (neighborhood attention's bias)."""
    return {
        id(param)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if name == RPB_PARAMETER_NAME
    }


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters NAT trains without weight decay (by default).

    Args:
        model: Any module (a whole detector / segmentor or a bare backbone).

    Returns:
        ``id()`` of every parameter owned directly by a normalization layer and of every parameter
        whose own name is ``rpb`` (the relative positional bias of neighborhood attention).
    """
    return norm_parameter_ids(model) | rpb_parameter_ids(model)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class NATOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``DefaultOptimWrapperConstructor`` + weight decay 0 on every norm and ``rpb`` parameter.

    Everything else in ``paramwise_cfg`` (``custom_keys`` with ``lr_mult`` / ``decay_mult``,
    ``bias_lr_mult``, ...) behaves as in mmengine; only the weight decay of normalization-layer
    parameters and of ``rpb`` tables is forced afterwards, whatever key matched them, while their
    learning-rate multiplier is kept: norms get 0, ``rpb`` gets the base weight decay times
    ``paramwise_cfg['rpb_decay_mult']`` (default 0). Use it in a config with::

        optim_wrapper = dict(
            constructor='NATOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        # An empty paramwise_cfg makes mmengine skip add_params (one group for all parameters);
        # the rule below must still apply, so always group per parameter.
        paramwise_cfg = dict(paramwise_cfg or {'custom_keys': {}})
        self.rpb_decay_mult = float(paramwise_cfg.pop('rpb_decay_mult', 0.0))
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(
        self,
        params: list[dict],
        module: nn.Module,
        prefix: str = '',
        is_dcn_module: int | float | None = None,
    ) -> None:
        """Fill ``params`` like mmengine does, then set the decay of norms and ``rpb``.

        Args:
            params: Parameter groups, filled in place (one dict per parameter).
            module: The module whose parameters are added.
            prefix: Name prefix of ``module``; empty at the top-level call.
            is_dcn_module: Passed through to mmengine.
        """
        super().add_params(params, module, prefix=prefix, is_dcn_module=is_dcn_module)
        # mmengine recurses through this method; post-process once, at the top-level call.
        if prefix != '' or self.base_wd is None:
            return
        norm_ids, rpb_ids = norm_parameter_ids(module), rpb_parameter_ids(module)
        for group in params:
            ids = [id(param) for param in group['params']]
            if all(i in norm_ids for i in ids):
                group['weight_decay'] = 0.0
            elif all(i in rpb_ids for i in ids):
                group['weight_decay'] = self.base_wd * self.rpb_decay_mult
