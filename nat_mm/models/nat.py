"""Neighborhood Attention Transformer (NAT) and Dilated NAT (DiNAT) backbones for OpenMMLab 2.0.

Papers: NAT (Hassani et al., CVPR 2023, arXiv:2204.07143) and DiNAT (Hassani & Shi,
arXiv:2209.15001). Follows SHI-Labs/Neighborhood-Attention-Transformer ``detection/nat.py``
(@ d334f5b) module for module, so original, downstream and HuggingFace checkpoints load one-to-one
(see :mod:`nat_mm.checkpoint`). Reading order: presets -> backbone (the layers are in
:mod:`nat_mm.models.layers`).
"""

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import nn

from nat_mm.checkpoint import load_backbone_checkpoint
from nat_mm.errors import NatMMError
from nat_mm.models.dilations import DILATION_SCHEDULES, resolve_dilations
from nat_mm.models.layers import (
    LAYER_NORM_EPS,
    ConvDownsampler,
    ConvTokenizer,
    NATLayer,
    NATStage,
    init_module,
)


class ArchSpec(NamedTuple):
    """Hyper-parameters that define a published variant."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: float
    layer_scale: float | None


NAT_ARCHS: dict[str, ArchSpec] = {
    'mini': ArchSpec(64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0, None),
    'tiny': ArchSpec(64, (3, 4, 18, 5), (2, 4, 8, 16), 3.0, None),
    'small': ArchSpec(96, (3, 4, 18, 5), (3, 6, 12, 24), 2.0, 1e-5),
    'base': ArchSpec(128, (3, 4, 18, 5), (4, 8, 16, 32), 2.0, 1e-5),
}
# DiNAT-Small was trained without layer-scale; DiNAT-Large exists only for DiNAT.
DINAT_ARCHS: dict[str, ArchSpec] = {
    **NAT_ARCHS,
    'small': NAT_ARCHS['small']._replace(layer_scale=None),
    'large': ArchSpec(192, (3, 4, 18, 5), (6, 12, 24, 48), 2.0, None),
}


def _resolve_arch(
    arch: str | None, archs: dict[str, ArchSpec], explicit: dict[str, object]
) -> ArchSpec:
    """Returns the preset named ``arch``, or the explicit values when ``arch`` is None."""
    if arch is None:
        required = ('embed_dim', 'depths', 'num_heads', 'mlp_ratio')
        absent = [name for name in required if explicit[name] is None]
        if absent:
            raise ValueError(
                f'arch=None needs explicit {absent}; or pass arch, one of {sorted(archs)}'
            )
        spec = ArchSpec(
            embed_dim=explicit['embed_dim'],
            depths=tuple(explicit['depths']),
            num_heads=tuple(explicit['num_heads']),
            mlp_ratio=float(explicit['mlp_ratio']),
            layer_scale=explicit['layer_scale'],
        )
    else:
        if arch not in archs:
            raise ValueError(
                f'arch={arch!r} is not a known preset; expected one of {sorted(archs)}'
            )
        spec = archs[arch]
        preset = spec._asdict()
        conflicts = {
            name: value
            for name, value in explicit.items()
            if value is not None
            and (tuple(value) if isinstance(value, Sequence) else value) != preset[name]
        }
        if conflicts:
            raise ValueError(
                f'arch={arch!r} conflicts with explicit {conflicts} (preset: '
                f'{ {name: preset[name] for name in conflicts} }); pass either arch or explicit '
                f'values (arch=None)'
            )
    # The tokenizer's first convolution has embed_dim / 2 channels.
    if not isinstance(spec.embed_dim, int) or spec.embed_dim < 2 or spec.embed_dim % 2:
        raise ValueError(f'embed_dim must be an even int >= 2, got embed_dim={spec.embed_dim!r}')
    if not spec.depths or any(not isinstance(d, int) or d < 1 for d in spec.depths):
        raise ValueError(f'depths must be ints >= 1, one per stage, got depths={spec.depths}')
    if not spec.mlp_ratio > 0:
        raise ValueError(f'mlp_ratio must be > 0, got mlp_ratio={spec.mlp_ratio}')
    if len(spec.depths) != len(spec.num_heads):
        raise ValueError(
            f'depths={spec.depths} and num_heads={spec.num_heads} must have the same length'
        )
    for i, heads in enumerate(spec.num_heads):
        channels = spec.embed_dim * 2**i
        if heads < 1 or channels % heads != 0:
            raise ValueError(
                f'stage {i} has {channels} channels (embed_dim={spec.embed_dim} * 2**{i}), which '
                f'num_heads[{i}]={heads} does not divide'
            )
    return spec


PRETRAINED_KEYS = ('type', 'checkpoint', 'trust', 'sha256')


def _is_pretrained(init_cfg: object) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def _check_pretrained_cfg(init_cfg: dict) -> None:
    """Fail at construction, not after the model is built, on a bad Pretrained ``init_cfg``."""
    unknown = sorted(set(init_cfg) - set(PRETRAINED_KEYS))
    if unknown:
        raise NatMMError(
            f"init_cfg=dict(type='Pretrained') takes {list(PRETRAINED_KEYS[1:])}, got also "
            f'{unknown} (the checkpoint layout is detected, no prefix is needed)',
            'init_cfg',
        )
    checkpoint = init_cfg.get('checkpoint')
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.fspath(checkpoint):
        raise NatMMError(
            f'init_cfg.checkpoint must be a path or URL, got {checkpoint!r}', 'init_cfg'
        )
    if not isinstance(init_cfg.get('trust', False), bool):
        raise NatMMError(
            f'init_cfg.trust must be True or False, got {init_cfg["trust"]!r}', 'init_cfg'
        )


@MODELS.register_module()
class NAT(BaseModule):
    """Neighborhood Attention Transformer backbone: multi-scale NCHW features at strides 4..32.

    Give either ``arch`` (a preset of :attr:`arch_settings`) or the explicit ``embed_dim``,
    ``depths``, ``num_heads``, ``mlp_ratio`` (and ``layer_scale``); explicit values that disagree
    with the preset raise. Parameter names equal upstream's, so checkpoints map one-to-one.

    Args:
        arch: Preset name ('mini', 'tiny', 'small', 'base'; DiNAT adds 'large'), or None.
        embed_dim: Channels of stage 0 (doubled at every stage).
        depths: Layers per stage.
        num_heads: Attention heads per stage.
        mlp_ratio: MLP hidden size / channels.
        layer_scale: Initial layer-scale value (1e-5 upstream for NAT-S/B, DiNAT-B), None for none.
        kernel_size: Odd neighborhood side (7; 11 for DiNAT-L 11x11).
        dilations: Schedule name of :data:`~nat_mm.models.dilations.DILATION_SCHEDULES`, explicit
            ``dilations[stage][layer]``, or None for the class default (:attr:`default_dilations`:
            none for NAT, 'imagenet-224' for DiNAT).
        rel_pos_bias: Learn relative positional biases (all published checkpoints have them).
        qkv_bias: Bias in the qkv projections.
        qk_scale: Query scale; None means ``head_dim ** -0.5``.
        drop_path_rate: Stochastic depth, increasing linearly from 0 over all layers.
        attn_drop_rate: Must be 0: neighborhood attention has no attention-probability dropout.
        drop_rate: Dropout after the attention projection and in the MLP.
        out_indices: Stages whose (normalized) output is returned, strictly increasing. Stages
            after the last one are not built, nor the last one's downsampler (as timm's
            ``features_only``): they would get no gradient, which DDP with
            ``find_unused_parameters=False`` rejects. See :attr:`pruned_prefixes`.
        frozen_stages: -1 freezes nothing, 0 the patch embedding, i >= 1 also stages 0..i-1 with
            their downsamplers and output norms (those that are built).
        with_cp: Gradient checkpointing per layer (same outputs and gradients, less memory).
        attn_backend: ``nat_mm.ops.na2d`` backend ('cpu', 'torch', 'flex', 'natten') or None (auto).
        in_channels: Image channels.
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads
            original, mmdet/mmseg or HuggingFace checkpoints strictly (see :meth:`init_weights`),
            tensors only; add ``trust=True`` to unpickle an old checkpoint you trust fully, and
            ``sha256='...'`` to check the file's hash.

    Subclasses with another stem or downsampler (:class:`~nat_mm.models.dinats.DiNATs`) set the
    class attributes :attr:`tokenizer`, :attr:`downsampler`, :attr:`stage_list_name`,
    :attr:`dilation_schedules` and :attr:`arch_settings`; everything else is shared.

    Attributes:
        out_channels: Channels of each returned map.
        strides: Stride of each returned map w.r.t. the input.
        pruned_prefixes: State-dict key prefixes of the parts of the architecture that
            ``out_indices`` leaves unbuilt; loading a full checkpoint ignores (and logs) them.
    """

    arch_settings: dict[str, ArchSpec] = NAT_ARCHS
    default_dilations: str | None = None
    dilation_schedules = DILATION_SCHEDULES
    # Stem ``(in_channels, embed_dim)``: [B, in, H, W] -> [B, ceil(H/4), ceil(W/4), embed_dim].
    tokenizer: type[nn.Module] = ConvTokenizer
    # Between stages ``(dim)``: [B, H, W, dim] -> [B, ceil(H/2), ceil(W/2), 2 dim].
    downsampler: type[nn.Module] = ConvDownsampler
    # Upstream's attribute name of the stage list (state-dict prefix).
    stage_list_name: str = 'levels'

    def __init__(
        self,
        arch: str | None = None,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        mlp_ratio: float | None = None,
        layer_scale: float | None = None,
        kernel_size: int = 7,
        dilations: str | Sequence[Sequence[int]] | None = None,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.2,
        attn_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        with_cp: bool = False,
        attn_backend: str | None = None,
        in_channels: int = 3,
        init_cfg: dict | None = None,
    ) -> None:
        if _is_pretrained(init_cfg):
            _check_pretrained_cfg(init_cfg)
        super().__init__(init_cfg=init_cfg)
        spec = _resolve_arch(
            arch,
            self.arch_settings,
            dict(
                embed_dim=embed_dim,
                depths=depths,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                layer_scale=layer_scale,
            ),
        )
        num_stages = len(spec.depths)
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(
                f'kernel_size must be an odd int >= 3, got kernel_size={kernel_size!r}'
            )
        if attn_drop_rate != 0:
            raise ValueError(
                f'attn_drop_rate={attn_drop_rate} is not supported: neighborhood attention has no '
                f'attention-probability dropout (every published recipe uses 0.0)'
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        out_indices = tuple(out_indices)
        if (
            not out_indices
            or any(not 0 <= i < num_stages for i in out_indices)
            or list(out_indices) != sorted(set(out_indices))
        ):
            raise ValueError(
                f'out_indices={out_indices} must be strictly increasing stage indices in '
                f'0..{num_stages - 1}'
            )
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages={frozen_stages} must be in -1..{num_stages}')
        stage_dilations = resolve_dilations(
            self.default_dilations if dilations is None else dilations,
            spec.depths,
            self.dilation_schedules,
        )

        self.arch = spec
        self.in_channels = in_channels
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.dilations = stage_dilations
        self.num_features = tuple(spec.embed_dim * 2**i for i in range(num_stages))
        self.out_channels = tuple(self.num_features[i] for i in out_indices)
        self.strides = tuple(4 * 2**i for i in out_indices)
        last = out_indices[-1]
        name = self.stage_list_name
        self.pruned_prefixes = (f'{name}.{last}.downsample.',) if last < num_stages - 1 else ()
        for i in range(last + 1, num_stages):
            self.pruned_prefixes += (f'{name}.{i}.', f'norm{i}.')

        self.patch_embed = self.tokenizer(in_channels, spec.embed_dim)
        # Over all stages of the architecture: the built ones keep the rates of the full model.
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths), device='cpu').tolist()
        self.add_module(name, nn.ModuleList())
        for i, dim in enumerate(self.num_features[: last + 1]):
            first = sum(spec.depths[:i])
            blocks = [
                NATLayer(
                    dim,
                    spec.num_heads[i],
                    kernel_size,
                    dilation,
                    mlp_ratio=spec.mlp_ratio,
                    layer_scale=spec.layer_scale,
                    drop_path_rate=rates[first + j],
                    drop_rate=drop_rate,
                    rel_pos_bias=rel_pos_bias,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    attn_backend=attn_backend,
                )
                for j, dilation in enumerate(stage_dilations[i])
            ]
            downsample = self.downsampler(dim) if i < last else None
            self.stages.append(NATStage(blocks, downsample, with_cp))
        # Output norms exist only for returned stages, as in the upstream detection backbone.
        for i in out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i], eps=LAYER_NORM_EPS))

        self.apply(init_module)
        self._freeze_stages()

    @property
    def stages(self) -> nn.ModuleList:
        """The built stages (:class:`NATStage`), under upstream's name :attr:`stage_list_name`."""
        return getattr(self, self.stage_list_name)

    def _freeze_stages(self) -> None:
        frozen_modules = [self.patch_embed] if self.frozen_stages >= 0 else []
        for i in range(min(max(self.frozen_stages, 0), len(self.stages))):
            frozen_modules.append(self.stages[i])
            if i in self.out_indices:
                frozen_modules.append(getattr(self, f'norm{i}'))
        for module in frozen_modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'NAT':
        """Sets the training mode, keeping frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        """Upstream random init, or strict loading of ``init_cfg=dict(type='Pretrained', ...)``.

        Other ``init_cfg`` types are handled by mmengine's :meth:`BaseModule.init_weights`.
        """
        if _is_pretrained(self.init_cfg):
            load_backbone_checkpoint(
                self,
                self.init_cfg['checkpoint'],
                trust=self.init_cfg.get('trust', False),
                sha256=self.init_cfg.get('sha256'),
            )
        elif self.init_cfg is None:
            self.apply(init_module)
        else:
            super().init_weights()
            return
        self._is_init = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, in_channels, H, W] -> one [B, out_channels[k], ~H/strides[k], ~W/strides[k]] per
        out_index (sizes round up at every stride-2 step)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'expected input of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}'
            )
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            stage_out, x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(stage_out).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


@MODELS.register_module()
class DiNAT(NAT):
    """Dilated Neighborhood Attention Transformer: :class:`NAT` with dilations.

    Same arguments as :class:`NAT`. Differences: ``dilations=None`` means the ImageNet-224
    schedule (the one every ImageNet checkpoint was trained with; downstream recipes pass
    'coco', 'ade20k-512', ... explicitly), and the presets add 'large' and drop layer-scale from
    'small', as published.
    """

    arch_settings = DINAT_ARCHS
    default_dilations = 'imagenet-224'
