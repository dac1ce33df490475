"""Independent test reference for the NAT / DiNAT backbone: no nat_mm imports.

Implements, from the written spec (docs/neighborhood-attention.md sections 1-3 and
docs/original-models.md section 1), the original detection backbone's forward as plain functions
of a state dict in the original layout, with a vectorised gather-based neighborhood attention and
explicit padding / cropping. Also writes random state dicts in the original layout and converts
them to HuggingFace's layout, so that checkpoint loading is checked against what the files hold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5


# ----------------------------------------------------------------------------- attention


def axis_windows(length: int, kernel: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key index and RPB index of each window slot of each query on one axis.

    docs/neighborhood-attention.md sections 1-2.

    Returns:
        keys [L, K] and bias [L, K] (long), bias = (key - query) // d + K - 1.
    """
    query = torch.arange(length)
    residue, position = query % dilation, query // dilation
    group_length = (length - residue + dilation - 1) // dilation
    start = torch.minimum((position - kernel // 2).clamp(min=0), group_length - kernel)
    keys = (start[:, None] + torch.arange(kernel)) * dilation + residue[:, None]
    bias = torch.div(keys - query[:, None], dilation, rounding_mode='floor') + kernel - 1
    return keys, bias


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    dilation: int,
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """q, k, v [B, heads, H, W, D] -> [B, heads, H, W, D]; needs H, W >= kernel * dilation."""
    height, width = q.shape[2:4]
    assert height >= kernel * dilation and width >= kernel * dilation
    rows, row_bias = axis_windows(height, kernel, dilation)
    cols, col_bias = axis_windows(width, kernel, dilation)
    # Gather the window of every query: [B, heads, H, K, W, K, D] -> [B, heads, H, W, K*K, D].
    row_index, col_index = rows[:, :, None, None], cols[None, None, :, :]
    keys = k[:, :, row_index, col_index].permute(0, 1, 2, 4, 3, 5, 6).flatten(4, 5)
    values = v[:, :, row_index, col_index].permute(0, 1, 2, 4, 3, 5, 6).flatten(4, 5)
    logits = ((q * scale).unsqueeze(4) * keys).sum(-1)  # [B, heads, H, W, K*K]
    if rpb is not None:
        bias = rpb[:, row_bias[:, :, None, None], col_bias[None, None, :, :]]  # [h, H, K, W, K]
        logits = logits + bias.permute(0, 1, 3, 2, 4).flatten(3, 4)
    weights = logits.softmax(dim=-1)
    return (weights.unsqueeze(-1) * values).sum(-2)


# ----------------------------------------------------------------------------- model


def _layer_norm(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f'{name}.weight'], sd[f'{name}.bias'], EPS)


def _linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.linear(x, sd[f'{name}.weight'], sd.get(f'{name}.bias'))


def attention_layer(
    x: torch.Tensor, sd: dict, name: str, heads: int, kernel: int, dilation: int
) -> torch.Tensor:
    """x [B, H, W, C] already normalised -> [B, H, W, C] (docs/neighborhood-attention.md s. 3)."""
    _, height, width, channels = x.shape
    window = kernel * dilation
    padded = F.pad(x, (0, 0, 0, max(0, window - width), 0, max(0, window - height)))
    qkv = _linear(padded, sd, f'{name}.qkv')
    qkv = qkv.reshape(*padded.shape[:3], 3, heads, channels // heads).permute(3, 0, 4, 1, 2, 5)
    out = neighborhood_attention(
        qkv[0], qkv[1], qkv[2], kernel, dilation, sd.get(f'{name}.rpb'), (channels // heads) ** -0.5
    )
    out = out.permute(0, 2, 3, 1, 4).flatten(3)[:, :height, :width]
    return _linear(out, sd, f'{name}.proj')


def nat_forward(
    sd: dict,
    image: torch.Tensor,
    num_heads: tuple[int, ...],
    kernel: int,
    dilations: list[list[int]],
    out_indices: tuple[int, ...],
) -> list[torch.Tensor]:
    """The original detection backbone's forward (layer-scale iff the state dict has gammas)."""
    x = F.conv2d(image, sd['patch_embed.proj.0.weight'], sd['patch_embed.proj.0.bias'], 2, 1)
    x = F.conv2d(x, sd['patch_embed.proj.1.weight'], sd['patch_embed.proj.1.bias'], 2, 1)
    x = _layer_norm(x.permute(0, 2, 3, 1), sd, 'patch_embed.norm')
    outputs = []
    for stage, stage_dilations in enumerate(dilations):
        for layer, dilation in enumerate(stage_dilations):
            name = f'levels.{stage}.blocks.{layer}'
            scale1, scale2 = sd.get(f'{name}.gamma1', 1.0), sd.get(f'{name}.gamma2', 1.0)
            attn = attention_layer(
                _layer_norm(x, sd, f'{name}.norm1'),
                sd,
                f'{name}.attn',
                num_heads[stage],
                kernel,
                dilation,
            )
            x = x + scale1 * attn
            hidden = F.gelu(_linear(_layer_norm(x, sd, f'{name}.norm2'), sd, f'{name}.mlp.fc1'))
            x = x + scale2 * _linear(hidden, sd, f'{name}.mlp.fc2')
        if stage in out_indices:
            outputs.append(_layer_norm(x, sd, f'norm{stage}').permute(0, 3, 1, 2))
        if f'levels.{stage}.downsample.reduction.weight' in sd:
            weight = sd[f'levels.{stage}.downsample.reduction.weight']
            x = F.conv2d(x.permute(0, 3, 1, 2), weight, None, 2, 1).permute(0, 2, 3, 1)
            x = _layer_norm(x, sd, f'levels.{stage}.downsample.norm')
    return outputs


# ----------------------------------------------------------------------------- state dicts


def random_original_state_dict(
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    mlp_ratio: float,
    kernel: int,
    layer_scale: bool,
    out_indices: tuple[int, ...],
    classifier: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Random weights in the original layout (non-trivial norms, biases, RPBs and gammas)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * std + mean

    def conv(name: str, out_ch: int, in_ch: int, bias: bool) -> None:
        sd[f'{name}.weight'] = rand(out_ch, in_ch, 3, 3, std=1 / math.sqrt(9 * in_ch))
        if bias:
            sd[f'{name}.bias'] = rand(out_ch, std=0.1)

    def linear(name: str, out_f: int, in_f: int) -> None:
        sd[f'{name}.weight'] = rand(out_f, in_f, std=1 / math.sqrt(in_f))
        sd[f'{name}.bias'] = rand(out_f, std=0.1)

    def norm(name: str, channels: int) -> None:
        sd[f'{name}.weight'] = rand(channels, std=0.2, mean=1.0)
        sd[f'{name}.bias'] = rand(channels, std=0.1)

    sd: dict[str, torch.Tensor] = {}
    conv('patch_embed.proj.0', embed_dim // 2, 3, True)
    conv('patch_embed.proj.1', embed_dim, embed_dim // 2, True)
    norm('patch_embed.norm', embed_dim)
    for stage, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
        dim = embed_dim * 2**stage
        for layer in range(depth):
            name = f'levels.{stage}.blocks.{layer}'
            norm(f'{name}.norm1', dim)
            linear(f'{name}.attn.qkv', 3 * dim, dim)
            sd[f'{name}.attn.rpb'] = rand(heads, 2 * kernel - 1, 2 * kernel - 1, std=1.0)
            linear(f'{name}.attn.proj', dim, dim)
            norm(f'{name}.norm2', dim)
            linear(f'{name}.mlp.fc1', int(dim * mlp_ratio), dim)
            linear(f'{name}.mlp.fc2', dim, int(dim * mlp_ratio))
            if layer_scale:
                sd[f'{name}.gamma1'] = rand(dim, std=0.3, mean=0.5)
                sd[f'{name}.gamma2'] = rand(dim, std=0.3, mean=0.5)
        if stage < len(depths) - 1:
            conv(f'levels.{stage}.downsample.reduction', 2 * dim, dim, False)
            norm(f'levels.{stage}.downsample.norm', 2 * dim)
    final_dim = embed_dim * 2 ** (len(depths) - 1)
    if classifier:
        norm('norm', final_dim)
        linear('head', 1000, final_dim)
    else:
        for stage in out_indices:
            norm(f'norm{stage}', embed_dim * 2**stage)
    return sd


_HF_LAYER_NAMES = [
    ('norm1', 'layernorm_before'),
    ('attn.rpb', 'attention.self.rpb'),
    ('attn.proj', 'attention.output.dense'),
    ('norm2', 'layernorm_after'),
    ('mlp.fc1', 'intermediate.dense'),
    ('mlp.fc2', 'output.dense'),
]


def to_huggingface_layout(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Original layout -> transformers' Nat/Dinat layout (names from original-models.md)."""
    hf: dict[str, torch.Tensor] = {}
    gammas: dict[str, list] = {}
    for key, value in sd.items():
        parts = key.split('.')
        if parts[0] == 'patch_embed':
            rest = '.'.join(parts[1:])
            rest = rest.replace('proj.', 'patch_embeddings.projection.')
            hf[f'{prefix}embeddings.{rest}'] = value
        elif parts[0] == 'levels' and parts[2] == 'downsample':
            hf[f'{prefix}encoder.{key}'] = value
        elif parts[0] == 'levels':
            layer = f'{prefix}encoder.levels.{parts[1]}.layers.{parts[3]}'
            rest = '.'.join(parts[4:])
            if rest.startswith('attn.qkv.'):
                for name, chunk in zip(('query', 'key', 'value'), value.chunk(3), strict=True):
                    hf[f'{layer}.attention.self.{name}.{parts[-1]}'] = chunk.clone()
                continue
            if rest in ('gamma1', 'gamma2'):
                gammas.setdefault(f'{layer}.layer_scale_parameters', [None, None])[
                    int(rest[-1]) - 1
                ] = value
                continue
            for original, hf_name in _HF_LAYER_NAMES:
                if rest.startswith(original + '.') or rest == original:
                    hf[f'{layer}.{hf_name}{rest[len(original) :]}'] = value
                    break
            else:
                raise KeyError(key)
        elif parts[0] == 'norm':
            hf[f'{prefix}layernorm.{parts[1]}'] = value
        elif parts[0] == 'head':
            hf[f'classifier.{parts[1]}'] = value
        elif parts[0].startswith('norm'):
            hf[f'hidden_states_norms.stage{int(parts[0][4:]) + 1}.{parts[1]}'] = value
        else:
            raise KeyError(key)
    for key, (gamma1, gamma2) in gammas.items():
        hf[key] = torch.stack([gamma1, gamma2])
    return hf
