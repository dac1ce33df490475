"""Independent test reference for the DiNAT_s backbone: no nat_mm.models imports.

Written from upstream's ``detection/dinats.py`` and ``classification/dinats.py``
(SHI-Labs/Neighborhood-Attention-Transformer @ d334f5b; docs/original-models.md section 5) as
plain functions of a state dict in upstream's layout, reusing the neighborhood-attention oracle of
:mod:`nat_mm.testing.nat_reference`. Also writes random state dicts in that layout, with the key
names and shapes upstream's modules have.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nat_mm.testing.nat_reference import _layer_norm, _linear, attention_layer

PATCH_SIZE = 4


def patch_embed(sd: dict, image: torch.Tensor) -> torch.Tensor:
    """``PatchEmbed``: pad W then H up to a multiple of 4, 4x4 stride-4 conv, NHWC, LayerNorm."""
    _, _, height, width = image.shape
    if width % PATCH_SIZE:
        image = F.pad(image, (0, PATCH_SIZE - width % PATCH_SIZE))
    if height % PATCH_SIZE:
        image = F.pad(image, (0, 0, 0, PATCH_SIZE - height % PATCH_SIZE))
    x = F.conv2d(image, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], PATCH_SIZE)
    return _layer_norm(x.permute(0, 2, 3, 1), sd, 'patch_embed.norm')


def patch_merging(sd: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    """``PatchMerging`` (Swin): pad odd sides, concatenate the 2x2 neighbours, norm, reduce."""
    _, height, width, _ = x.shape
    if height % 2 or width % 2:
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    x0 = x[:, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, :]
    x3 = x[:, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3], -1)
    return F.linear(_layer_norm(x, sd, f'{name}.norm'), sd[f'{name}.reduction.weight'])


def _stages(sd: dict, image: torch.Tensor, num_heads, kernel: int, dilations):
    """Yields (stage index, stage output before downsampling) of ``DiNAT_s.forward``."""
    x = patch_embed(sd, image)
    for stage, stage_dilations in enumerate(dilations):
        for layer, dilation in enumerate(stage_dilations):
            name = f'layers.{stage}.blocks.{layer}'
            attn = attention_layer(
                _layer_norm(x, sd, f'{name}.norm1'),
                sd,
                f'{name}.attn',
                num_heads[stage],
                kernel,
                dilation,
            )
            x = x + attn
            hidden = F.gelu(_linear(_layer_norm(x, sd, f'{name}.norm2'), sd, f'{name}.mlp.fc1'))
            x = x + _linear(hidden, sd, f'{name}.mlp.fc2')
        yield stage, x
        if f'layers.{stage}.downsample.reduction.weight' in sd:
            x = patch_merging(sd, x, f'layers.{stage}.downsample')


def dinats_forward(
    sd: dict,
    image: torch.Tensor,
    num_heads: tuple[int, ...],
    kernel: int,
    dilations: list[list[int]],
    out_indices: tuple[int, ...],
) -> list[torch.Tensor]:
    """The upstream detection / segmentation backbone's forward: ``norm{i}`` maps, NCHW."""
    return [
        _layer_norm(x, sd, f'norm{stage}').permute(0, 3, 1, 2)
        for stage, x in _stages(sd, image, num_heads, kernel, dilations)
        if stage in out_indices
    ]


def dinats_classify(
    sd: dict, image: torch.Tensor, num_heads: tuple[int, ...], kernel: int, dilations
) -> torch.Tensor:
    """The upstream ImageNet model's forward: last stage -> ``norm`` -> average pool -> ``head``."""
    *_, (_, x) = _stages(sd, image, num_heads, kernel, dilations)
    return _linear(_layer_norm(x, sd, 'norm').mean(dim=(1, 2)), sd, 'head')


def random_upstream_state_dict(
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    mlp_ratio: float,
    kernel: int,
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    classifier: bool = False,
    num_classes: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of upstream's ``DiNAT_s`` modules.

    ``classifier=True``: the ImageNet model (``norm``, ``head``; ``classification/dinats.py``);
    else the detection backbone (``norm{i}`` for ``out_indices``; ``detection/dinats.py``).
    NATTEN's ``NeighborhoodAttention2D`` holds ``qkv``, ``rpb`` and ``proj``; timm-style ``Mlp``
    holds ``fc1`` and ``fc2``; ``PatchMerging`` holds ``reduction`` (no bias) and ``norm`` (4C).
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * std + mean

    def linear(name: str, out_f: int, in_f: int, bias: bool = True) -> None:
        sd[f'{name}.weight'] = rand(out_f, in_f, std=1 / math.sqrt(in_f))
        if bias:
            sd[f'{name}.bias'] = rand(out_f, std=0.1)

    def norm(name: str, channels: int) -> None:
        sd[f'{name}.weight'] = rand(channels, std=0.2, mean=1.0)
        sd[f'{name}.bias'] = rand(channels, std=0.1)

    sd: dict[str, torch.Tensor] = {}
    fan_in = 3 * PATCH_SIZE**2
    sd['patch_embed.proj.weight'] = rand(
        embed_dim, 3, PATCH_SIZE, PATCH_SIZE, std=1 / math.sqrt(fan_in)
    )
    sd['patch_embed.proj.bias'] = rand(embed_dim, std=0.1)
    norm('patch_embed.norm', embed_dim)
    for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
        dim = embed_dim * 2**stage
        hidden = int(dim * mlp_ratio)
        for layer in range(depth):
            name = f'layers.{stage}.blocks.{layer}'
            norm(f'{name}.norm1', dim)
            linear(f'{name}.attn.qkv', 3 * dim, dim)
            sd[f'{name}.attn.rpb'] = rand(heads, 2 * kernel - 1, 2 * kernel - 1, std=1.0)
            linear(f'{name}.attn.proj', dim, dim)
            norm(f'{name}.norm2', dim)
            linear(f'{name}.mlp.fc1', hidden, dim)
            linear(f'{name}.mlp.fc2', dim, hidden)
        if stage < len(depths) - 1:
            linear(f'layers.{stage}.downsample.reduction', 2 * dim, 4 * dim, bias=False)
            norm(f'layers.{stage}.downsample.norm', 4 * dim)
    if classifier:
        final_dim = embed_dim * 2 ** (len(depths) - 1)
        norm('norm', final_dim)
        linear('head', num_classes, final_dim)
    else:
        for stage in out_indices:
            norm(f'norm{stage}', embed_dim * 2**stage)
    return sd
