"""Building blocks of NAT / DiNAT, named as upstream (``detection/nat.py`` @ d334f5b) so that
checkpoints map one-to-one: tokenizer, downsampler, MLP, neighborhood attention, layer, stage.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from nat_mm.ops import na2d

LAYER_NORM_EPS = 1e-5


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes whole samples of a residual branch and rescales the others.

    Keeps each sample with probability ``1 - drop_prob`` (float32 uniforms, whatever x's dtype).
    Written without branching on or specializing ``drop_prob`` (no ``bernoulli_(p)``, which takes
    a concrete float), so that under ``torch.compile`` every block's rate stays a graph input
    rather than a guard on its value; ``drop_prob=0`` keeps every sample unchanged.
    """
    if not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = torch.rand(shape, device=x.device) < keep_prob
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (identity in eval mode)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class ConvTokenizer(nn.Module):
    """Two stride-2 3x3 convolutions (no activation between) and a LayerNorm: overall stride 4.

    Args:
        in_channels: Image channels.
        embed_dim: Output channels C.
    """

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, H, W] -> [B, ceil(H/4), ceil(W/4), C] (channels-last)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """Stride-2 3x3 convolution doubling the channels, then LayerNorm (channels-last in and out)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
        x = x.permute(0, 3, 1, 2)
        if torch.compiler.is_compiling():
            # torch 2.13's inductor fails to lower a convolution of this view (a LayerNorm's
            # output, permuted) with dynamic shapes ("Invalid ranges [0:-1]"): compiled graphs
            # convolve a contiguous copy.
            x = x.contiguous()
        return self.norm(self.reduction(x).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, as upstream."""

    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NeighborhoodAttention2D(nn.Module):
    """Multi-head 2-D (dilated) neighborhood attention with relative positional bias.

    Maps smaller than ``kernel_size * dilation`` are zero-padded on the right/bottom before ``qkv``
    and cropped before ``proj``; padded tokens act as real keys (NATTEN 0.14 semantics,
    docs/neighborhood-attention.md section 3), so published checkpoints give the published numbers
    on any input size.

    Args:
        dim: Channels C.
        num_heads: Attention heads; C must be divisible by it.
        kernel_size: Odd window side K.
        dilation: Dilation d >= 1.
        rel_pos_bias: Learn an ``rpb`` table ``[heads, 2K-1, 2K-1]``.
        qkv_bias: Bias in the ``qkv`` projection.
        qk_scale: Query scale; None means ``head_dim ** -0.5``.
        proj_drop: Dropout after ``proj``.
        attn_backend: ``na2d`` backend ('cpu', 'torch', 'flex', 'natten'), or None for automatic.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int,
        rel_pos_bias: bool,
        qkv_bias: bool,
        qk_scale: float | None,
        proj_drop: float,
        attn_backend: str | None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            table_side = 2 * kernel_size - 1
            self.rpb = nn.Parameter(torch.zeros(num_heads, table_side, table_side))
        else:
            self.register_parameter('rpb', None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] (already normalized) -> [B, H, W, C]."""
        batch, height, width, channels = x.shape
        window = self.kernel_size * self.dilation
        # A captured graph (torch.compile, torch.export) pads and crops by copies at every size
        # (by zero when the map is large enough): the branch, and whether a cropped view is
        # contiguous, would each be a guard on H and W, so a recompile, or an exported graph
        # that holds on one side of K * d only. (sym_max: no guard on symbolic sizes either.)
        capturing = torch.compiler.is_compiling()
        max_ = torch.sym_max if capturing else max
        pad_bottom, pad_right = max_(0, window - height), max_(0, window - width)
        if capturing or pad_bottom or pad_right:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = x.shape[1:3]
        qkv = self.qkv(x).reshape(batch, padded_h, padded_w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each [B, Hp, Wp, heads, head_dim]
        out = na2d(
            q,
            k,
            v,
            self.kernel_size,
            dilation=self.dilation,
            rpb=self.rpb,
            scale=self.scale,
            backend=self.attn_backend,
        )
        out = out.reshape(batch, padded_h, padded_w, channels)
        if capturing:
            rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
            out = out.index_select(1, rows).index_select(2, cols)
        else:
            out = out[:, :height, :width]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f'heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, '
            f'rel_pos_bias={self.rpb is not None}'
        )


class NATLayer(nn.Module):
    """Pre-norm transformer layer: ``x + g1 * attn(norm1(x))``, then ``x + g2 * mlp(norm2(x))``.

    Args:
        dim: Channels C.
        num_heads: Attention heads.
        kernel_size: Neighborhood window side.
        dilation: Neighborhood dilation.
        mlp_ratio: MLP hidden size is ``int(mlp_ratio * C)``.
        layer_scale: Initial value of the learnable ``gamma1``/``gamma2`` vectors, or None for none.
        drop_path_rate: Stochastic depth probability of both residual branches.
        drop_rate: Dropout after ``attn.proj`` and inside the MLP.
        rel_pos_bias, qkv_bias, qk_scale, attn_backend: See :class:`NeighborhoodAttention2D`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int,
        mlp_ratio: float,
        layer_scale: float | None,
        drop_path_rate: float,
        drop_rate: float,
        rel_pos_bias: bool,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_backend: str | None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size,
            dilation,
            rel_pos_bias=rel_pos_bias,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            proj_drop=drop_rate,
            attn_backend=attn_backend,
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop_rate)
        self.layer_scale = layer_scale
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        attn_out = self.attn(self.norm1(x))
        if self.layer_scale is not None:
            attn_out = self.gamma1 * attn_out
        x = x + self.drop_path(attn_out)
        mlp_out = self.mlp(self.norm2(x))
        if self.layer_scale is not None:
            mlp_out = self.gamma2 * mlp_out
        return x + self.drop_path(mlp_out)


class NATStage(nn.Module):
    """A stage (``levels.{i}`` upstream, ``layers.{i}`` in DiNAT_s): its ``blocks`` and an optional
    ``downsample``.

    Args:
        blocks: The layers of the stage, applied in order.
        downsample: Downsampler applied after the stage (all stages but the last), or None.
        with_cp: Gradient-checkpoint every layer while training (saves activation memory).
    """

    def __init__(
        self, blocks: Sequence[NATLayer], downsample: nn.Module | None, with_cp: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, H, W, C] -> (stage output [B, H, W, C], downsampled [B, H/2, W/2, 2C] or None)."""
        for block in self.blocks:
            if self.with_cp and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else None)


def init_module(module: nn.Module) -> None:
    """Upstream init: trunc_normal(0.02) Linear and rpb, zero biases, unit LayerNorm, gammas."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, NeighborhoodAttention2D) and module.rpb is not None:
        nn.init.trunc_normal_(module.rpb, std=0.02)
    elif isinstance(module, NATLayer) and module.layer_scale is not None:
        nn.init.constant_(module.gamma1, module.layer_scale)
        nn.init.constant_(module.gamma2, module.layer_scale)
