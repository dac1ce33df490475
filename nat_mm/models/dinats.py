"""DiNAT_s: the Swin-layout variant of the Dilated Neighborhood Attention Transformer.

Paper: DiNAT (Hassani & Shi, arXiv:2209.15001), "DiNAT_s". Follows SHI-Labs/Neighborhood-Attention-
Transformer ``detection/dinats.py`` (= ``segmentation/dinats.py``; ``classification/dinats.py`` for
the presets) @ d334f5b: Swin-T/S/B/L with window self-attention replaced by neighborhood attention
and shifted windows by dilated neighborhood attention. Module names equal upstream's, so its
ImageNet and downstream checkpoints load one-to-one. Differences from NAT / DiNAT
(docs/original-models.md section 5): a 4x4 stride-4 patch embedding, Swin's patch merging between
stages, ``layers.{i}`` for the stages, mlp_ratio 4, no layer-scale, depths 2-2-6|18-2. Everything
else (layers, attention, outputs, flags, loading) is :class:`~nat_mm.models.nat.NAT`'s.
Reading order: layers -> presets -> backbone.
"""

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from nat_mm.models.dilations import DINATS_DILATION_SCHEDULES
from nat_mm.models.layers import LAYER_NORM_EPS
from nat_mm.models.nat import NAT, ArchSpec


class PatchEmbed(nn.Module):
    """Swin's stem: zero-pad right / bottom to a multiple of 4, 4x4 stride-4 convolution,
    LayerNorm (upstream ``patch_norm=True`` in every published model).

    Args:
        in_channels: Image channels.
        embed_dim: Output channels C.
    """

    patch_size = 4

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> [B, ceil(H/4), ceil(W/4), C] (channels-last)."""
        height, width = x.shape[2:]
        x = F.pad(x, (0, -width % self.patch_size, 0, -height % self.patch_size))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's downsampler: each 2x2 patch's four tokens concatenated, LayerNorm(4C), then
    ``Linear(4C, 2C, bias=False)``; odd sides are zero-padded right / bottom first.

    Args:
        dim: Input channels C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
        height, width = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Upstream's order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


# classification/dinats.py: dinat_s_{tiny,small,base,large} (large also _384 and _21k, the same
# network; the ImageNet-22k file's head is ignored as every head is).
DINATS_ARCHS: dict[str, ArchSpec] = {
    'tiny': ArchSpec(96, (2, 2, 6, 2), (3, 6, 12, 24), 4.0, None),
    'small': ArchSpec(96, (2, 2, 18, 2), (3, 6, 12, 24), 4.0, None),
    'base': ArchSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), 4.0, None),
    'large': ArchSpec(192, (2, 2, 18, 2), (6, 12, 24, 48), 4.0, None),
}


@MODELS.register_module()
class DiNATs(NAT):
    """DiNAT_s backbone: multi-scale NCHW features at strides 4..32, Swin's layout with (dilated)
    neighborhood attention.

    Same arguments, attributes and checkpoint handling as :class:`~nat_mm.models.nat.NAT`
    (``out_indices`` pruning, ``frozen_stages``, ``with_cp``, ``init_cfg``). Differences: the
    presets are 'tiny', 'small', 'base', 'large' (:data:`DINATS_ARCHS`); ``dilations`` names a
    schedule of :data:`~nat_mm.models.dilations.DINATS_DILATION_SCHEDULES` ('imagenet-224', the
    default, 'imagenet-384', 'coco', 'ade20k-512', 'ade20k-640'); the stem is
    :class:`PatchEmbed`, the downsamplers :class:`PatchMerging`, the stages ``layers.{i}``.
    """

    arch_settings = DINATS_ARCHS
    default_dilations = 'imagenet-224'
    dilation_schedules = DINATS_DILATION_SCHEDULES
    tokenizer = PatchEmbed
    downsampler = PatchMerging
    stage_list_name = 'layers'
