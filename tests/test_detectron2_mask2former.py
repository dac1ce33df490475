"""detectron2 Mask2Former + DiNAT checkpoints (upstream's published DiNAT-L models), mmdet / mmseg.

The d2 weights here are random, written from the module definitions of facebookresearch/
Mask2Former (`mask2former/modeling/pixel_decoder/msdeformattn.py`, `.../transformer_decoder/
mask2former_transformer_decoder.py`, `maskformer_model.py`, `modeling/criterion.py`) and the NAT
repo's d2 backbone wrapper (`mask2former/dinat.py`); sizes are upstream's yaml files
(`mask2former/configs/{coco,ade20k}/.../dinat/maskformer2_dinat_large_IN21k_384_bs16_*.yaml` and
their bases) or shrunk. What is proven:

- parity: the same d2 weights, converted by nat_mm for mmdet / mmseg and by HuggingFace
  transformers' mapping (`convert_mask2former_original_pytorch_checkpoint_to_pytorch.py`, which
  imports detectron2, so its rename tables are transcribed below) into its own, independent
  `Mask2FormerForUniversalSegmentation`, give the same class and mask logits at every decoder
  layer on the same multi-scale features (fp32);
- the backbone keys: d2 `backbone.*` loads strictly into nat_mm's DiNAT and gives what the same
  weights give loaded directly, and what the independent reference (nat_mm.testing.nat_reference)
  computes;
- strict loading: the converted full-size d2 state dict fits the model of each of our three DiNAT-L
  Mask2Former configs exactly (meta tensors here, a real file in the slow test);
- preprocessing and classes: our configs normalise an image as d2 does (RGB, upstream's mean / std),
  have upstream's class count and put "no object" in the last class column, as d2 does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, TRANSFORMS, DefaultScope

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmsegmentation is not installed')

from nat_mm.apis.config import build_model, load_config, register_library
from nat_mm.checkpoint import detectron2 as d2_convert
from nat_mm.checkpoint import load_checkpoint, load_state_dict_strictly, unwrap_state_dict
from nat_mm.checkpoint.detectron2 import is_detectron2_mask2former, mask2former_to_openmmlab
from nat_mm.errors import NatMMError
from nat_mm.models import DiNAT
from nat_mm.testing.nat_reference import nat_forward

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = {
    'coco-panoptic': 'mmdet/dinat/mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco-panoptic.py',
    'coco-instance': 'mmdet/dinat/mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco.py',
    'ade20k-semantic': 'mmseg/dinat/mask2former_dinat-large-k11-in22k_8xb2-160k_ade20k-640x640.py',
}
HOSTS = {'coco-panoptic': 'mmdet', 'coco-instance': 'mmdet', 'ade20k-semantic': 'mmseg'}

# Upstream's yaml (MODEL.PIXEL_MEAN / PIXEL_STD, INPUT.FORMAT), identical for the three models.
D2_PIXEL_MEAN = [123.675, 116.280, 103.530]
D2_PIXEL_STD = [58.395, 57.120, 57.375]
D2_INPUT_FORMAT = 'RGB'
D2_NO_OBJECT_WEIGHT = 0.1  # MODEL.MASK_FORMER.NO_OBJECT_WEIGHT


@dataclass(frozen=True)
class D2Sizes:
    """A d2 Mask2Former + DiNAT model's sizes, by the names of upstream's yaml."""

    embed_dim: int  # DINAT.EMBED_DIM
    depths: tuple[int, ...]  # DINAT.DEPTHS
    num_heads: tuple[int, ...]  # DINAT.NUM_HEADS
    kernel_size: int  # DINAT.KERNEL_SIZE
    mlp_ratio: float  # DINAT.MLP_RATIO (train_m2f.py default)
    num_classes: int  # SEM_SEG_HEAD.NUM_CLASSES
    num_queries: int  # MASK_FORMER.NUM_OBJECT_QUERIES
    conv_dim: int = 256  # SEM_SEG_HEAD.CONVS_DIM
    mask_dim: int = 256  # SEM_SEG_HEAD.MASK_DIM
    encoder_layers: int = 6  # SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS
    encoder_ffn: int = 1024  # hard-coded in MSDeformAttnPixelDecoder.from_config
    hidden_dim: int = 256  # MASK_FORMER.HIDDEN_DIM
    decoder_layers: int = 9  # MASK_FORMER.DEC_LAYERS - 1 (10 in the yaml)
    decoder_ffn: int = 2048  # MASK_FORMER.DIM_FEEDFORWARD
    heads: int = 8  # MASK_FORMER.NHEADS (pixel decoder and decoder)

    @property
    def channels(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


DINAT_L = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), kernel_size=11)
FULL = {
    'coco-panoptic': D2Sizes(**DINAT_L, mlp_ratio=2.0, num_classes=133, num_queries=200),
    'coco-instance': D2Sizes(**DINAT_L, mlp_ratio=2.0, num_classes=80, num_queries=200),
    'ade20k-semantic': D2Sizes(**DINAT_L, mlp_ratio=2.0, num_classes=150, num_queries=100),
}


def small(name: str) -> D2Sizes:
    """The model of ``name`` shrunk for a CPU test; the class count stays the dataset's."""
    return replace(
        FULL[name],
        embed_dim=32,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        num_queries=8,
        conv_dim=64,
        mask_dim=64,
        encoder_layers=2,
        encoder_ffn=96,
        hidden_dim=64,
        decoder_layers=4,  # more than 3 levels: the level index wraps around once
        decoder_ffn=128,
    )


# ----------------------------------------------------------------------------- d2 state dicts


def d2_state_dict(sizes: D2Sizes, seed: int = 0, device: str = 'cpu') -> dict[str, torch.Tensor]:
    """Random weights of the d2 model (meta tensors for ``device='meta'``), every key it saves.

    Values: weights ~ N(0, 1/fan_in), biases and embeddings small, norms around 1, so that every
    path of the forward matters.
    """
    generator = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int, std: float, mean: float = 0.0) -> None:
        if device == 'meta':
            sd[key] = torch.empty(*shape, device='meta')
        else:
            sd[key] = torch.randn(*shape, generator=generator) * std + mean

    def linear(name: str, out_f: int, in_f: int, kernel: int = 1, bias: bool = True) -> None:
        shape = (out_f, in_f) if kernel == 0 else (out_f, in_f, kernel, kernel)
        put(f'{name}.weight', *shape, std=1 / math.sqrt(in_f * max(kernel, 1) ** 2))
        if bias:
            put(f'{name}.bias', out_f, std=0.1)

    def norm(name: str, channels: int) -> None:
        put(f'{name}.weight', channels, std=0.1, mean=1.0)
        put(f'{name}.bias', channels, std=0.1)

    def attention(name: str, dim: int) -> None:  # nn.MultiheadAttention
        put(f'{name}.in_proj_weight', 3 * dim, dim, std=1 / math.sqrt(dim))
        put(f'{name}.in_proj_bias', 3 * dim, std=0.1)
        linear(f'{name}.out_proj', dim, dim, kernel=0)

    # backbone.*: mask2former/dinat.py (ConvTokenizer, NATBlock with NATTEN's
    # NeighborhoodAttention2D qkv / rpb / proj, ConvDownsampler, norm{i} per output).
    c = sizes.embed_dim
    linear('backbone.patch_embed.proj.0', c // 2, 3, kernel=3)
    linear('backbone.patch_embed.proj.1', c, c // 2, kernel=3)
    norm('backbone.patch_embed.norm', c)
    for stage, (depth, heads) in enumerate(zip(sizes.depths, sizes.num_heads, strict=True)):
        dim, hidden = sizes.channels[stage], int(sizes.channels[stage] * sizes.mlp_ratio)
        for layer in range(depth):
            name = f'backbone.levels.{stage}.blocks.{layer}'
            norm(f'{name}.norm1', dim)
            linear(f'{name}.attn.qkv', 3 * dim, dim, kernel=0)
            side = 2 * sizes.kernel_size - 1
            put(f'{name}.attn.rpb', heads, side, side, std=0.5)
            linear(f'{name}.attn.proj', dim, dim, kernel=0)
            norm(f'{name}.norm2', dim)
            linear(f'{name}.mlp.fc1', hidden, dim, kernel=0)
            linear(f'{name}.mlp.fc2', dim, hidden, kernel=0)
        if stage < len(sizes.depths) - 1:
            linear(f'backbone.levels.{stage}.downsample.reduction', 2 * dim, dim, 3, bias=False)
            norm(f'backbone.levels.{stage}.downsample.norm', 2 * dim)
        norm(f'backbone.norm{stage}', dim)

    # sem_seg_head.pixel_decoder.*: MSDeformAttnPixelDecoder, input_proj from res5 down to res3.
    pd, d = 'sem_seg_head.pixel_decoder', sizes.conv_dim
    for level, in_channels in enumerate(sizes.channels[1:][::-1]):
        linear(f'{pd}.input_proj.{level}.0', d, in_channels)
        norm(f'{pd}.input_proj.{level}.1', d)  # GroupNorm(32, conv_dim)
    put(f'{pd}.transformer.level_embed', 3, d, std=0.5)
    points = sizes.heads * 3 * 4  # n_heads * n_levels * n_points
    for layer in range(sizes.encoder_layers):
        name = f'{pd}.transformer.encoder.layers.{layer}'
        linear(f'{name}.self_attn.sampling_offsets', 2 * points, d, kernel=0)
        linear(f'{name}.self_attn.attention_weights', points, d, kernel=0)
        linear(f'{name}.self_attn.value_proj', d, d, kernel=0)
        linear(f'{name}.self_attn.output_proj', d, d, kernel=0)
        norm(f'{name}.norm1', d)
        linear(f'{name}.linear1', sizes.encoder_ffn, d, kernel=0)
        linear(f'{name}.linear2', d, sizes.encoder_ffn, kernel=0)
        norm(f'{name}.norm2', d)
    linear(f'{pd}.mask_features', sizes.mask_dim, d)
    # One extra FPN level (res2): d2 Conv2d with GN and no bias (norm='GN').
    linear(f'{pd}.adapter_1', d, sizes.channels[0], bias=False)
    norm(f'{pd}.adapter_1.norm', d)
    linear(f'{pd}.layer_1', d, d, kernel=3, bias=False)
    norm(f'{pd}.layer_1.norm', d)

    # sem_seg_head.predictor.*: MultiScaleMaskedTransformerDecoder (input_proj are empty
    # nn.Sequential()s: conv_dim == hidden_dim, ENFORCE_INPUT_PROJ False).
    pr, h = 'sem_seg_head.predictor', sizes.hidden_dim
    for layer in range(sizes.decoder_layers):
        attention(f'{pr}.transformer_self_attention_layers.{layer}.self_attn', h)
        norm(f'{pr}.transformer_self_attention_layers.{layer}.norm', h)
        attention(f'{pr}.transformer_cross_attention_layers.{layer}.multihead_attn', h)
        norm(f'{pr}.transformer_cross_attention_layers.{layer}.norm', h)
        linear(f'{pr}.transformer_ffn_layers.{layer}.linear1', sizes.decoder_ffn, h, kernel=0)
        linear(f'{pr}.transformer_ffn_layers.{layer}.linear2', h, sizes.decoder_ffn, kernel=0)
        norm(f'{pr}.transformer_ffn_layers.{layer}.norm', h)
    norm(f'{pr}.decoder_norm', h)
    put(f'{pr}.query_feat.weight', sizes.num_queries, h, std=1.0)
    put(f'{pr}.query_embed.weight', sizes.num_queries, h, std=1.0)
    put(f'{pr}.level_embed.weight', 3, h, std=0.5)
    linear(f'{pr}.class_embed', sizes.num_classes + 1, h, kernel=0)
    for i in range(3):
        linear(f'{pr}.mask_embed.layers.{i}', sizes.mask_dim if i == 2 else h, h, kernel=0)

    # criterion.empty_weight: SetCriterion's buffer, [1] * num_classes + [eos_coef].
    weight = torch.ones(sizes.num_classes + 1, device=device)
    if device != 'meta':
        weight[-1] = D2_NO_OBJECT_WEIGHT
    sd['criterion.empty_weight'] = weight
    return sd


# ----------------------------------------------------------------------------- our models


def shrunk_config(name: str, sizes: D2Sizes) -> Config:
    """Our config of ``name`` with the backbone and the head at ``sizes`` (nothing else changed)."""
    cfg = load_config(CONFIG_DIR / CONFIGS[name])
    cfg.model.backbone.update(
        arch=None,
        embed_dim=sizes.embed_dim,
        depths=list(sizes.depths),
        num_heads=list(sizes.num_heads),
        mlp_ratio=sizes.mlp_ratio,
        kernel_size=sizes.kernel_size,
        dilations=[[1] * depth for depth in sizes.depths],
        init_cfg=None,
    )
    head = cfg.model.panoptic_head if HOSTS[name] == 'mmdet' else cfg.model.decode_head
    head.update(
        in_channels=sizes.channels,
        feat_channels=sizes.conv_dim,
        out_channels=sizes.mask_dim,
        num_queries=sizes.num_queries,
    )
    encoder = head.pixel_decoder.encoder
    encoder.num_layers = sizes.encoder_layers
    encoder.layer_cfg.self_attn_cfg.update(embed_dims=sizes.conv_dim, num_heads=sizes.heads)
    encoder.layer_cfg.ffn_cfg.update(
        embed_dims=sizes.conv_dim, feedforward_channels=sizes.encoder_ffn
    )
    head.pixel_decoder.positional_encoding.num_feats = sizes.conv_dim // 2
    decoder = head.transformer_decoder
    decoder.num_layers = sizes.decoder_layers
    for attn in ('self_attn_cfg', 'cross_attn_cfg'):
        decoder.layer_cfg[attn].update(embed_dims=sizes.hidden_dim, num_heads=sizes.heads)
    decoder.layer_cfg.ffn_cfg.update(
        embed_dims=sizes.hidden_dim, feedforward_channels=sizes.decoder_ffn
    )
    head.positional_encoding.num_feats = sizes.hidden_dim // 2
    return cfg


def head_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.panoptic_head if hasattr(model, 'panoptic_head') else model.decode_head


@pytest.fixture(scope='module')
def shrunk_model():
    """``shrunk_model(name)``: our config's model at :func:`small` sizes, built once per module
    (each test loads its own weights into it, strictly: every parameter is replaced)."""
    models = {}

    def get(name: str) -> torch.nn.Module:
        if name not in models:
            models[name] = build_model(shrunk_config(name, small(name))).eval()
        return models[name]

    return get


def load_converted(model: torch.nn.Module, name: str, d2: dict) -> torch.nn.Module:
    """``model`` with the d2 weights converted by nat_mm, loaded strictly."""
    load_state_dict_strictly(model, mask2former_to_openmmlab(d2, HOSTS[name]), 'converted d2')
    return model


# ----------------------------------------------------------------------------- HuggingFace


def hf_state_dict_from_d2(d2: dict, sizes: D2Sizes) -> dict[str, torch.Tensor]:
    """transformers' mapping of a d2 Mask2Former, without the backbone: its conversion script's
    rename tables (`replace_pixel_module`, `replace_masked_attention_decoder`,
    `replace_keys_qkv_transformer_decoder`, `replace_transformer_module`,
    `replace_universal_segmentation_module`). The script splits the self-attention's in_proj at
    256; here at the hidden size."""
    src_pd, dst_pd = 'sem_seg_head.pixel_decoder', 'model.pixel_level_module.decoder'
    src_pr, dst_tm = 'sem_seg_head.predictor', 'model.transformer_module'
    renames = []

    def both(src: str, dst: str) -> None:
        renames.extend((f'{src}.{p}', f'{dst}.{p}') for p in ('weight', 'bias'))

    both(f'{src_pd}.adapter_1', f'{dst_pd}.adapter_1.0')
    renames.pop()  # the adapter conv has no bias
    both(f'{src_pd}.adapter_1.norm', f'{dst_pd}.adapter_1.1')
    both(f'{src_pd}.layer_1', f'{dst_pd}.layer_1.0')
    renames.pop()
    both(f'{src_pd}.layer_1.norm', f'{dst_pd}.layer_1.1')
    for i in range(3):
        for j in range(2):
            both(f'{src_pd}.input_proj.{i}.{j}', f'{dst_pd}.input_projections.{i}.{j}')
    renames.append((f'{src_pd}.transformer.level_embed', f'{dst_pd}.level_embed'))
    for layer in range(sizes.encoder_layers):
        src, dst = (
            f'{src_pd}.transformer.encoder.layers.{layer}',
            f'{dst_pd}.encoder.layers.{layer}',
        )
        both(f'{src}.linear1', f'{dst}.fc1')
        both(f'{src}.linear2', f'{dst}.fc2')
        both(f'{src}.norm1', f'{dst}.self_attn_layer_norm')
        both(f'{src}.norm2', f'{dst}.final_layer_norm')
        for part in ('attention_weights', 'output_proj', 'sampling_offsets', 'value_proj'):
            both(f'{src}.self_attn.{part}', f'{dst}.self_attn.{part}')
    both(f'{src_pd}.mask_features', f'{dst_pd}.mask_projection')

    dst_dec = f'{dst_tm}.decoder'
    for layer in range(sizes.decoder_layers):
        self_attn = f'{src_pr}.transformer_self_attention_layers.{layer}'
        cross = f'{src_pr}.transformer_cross_attention_layers.{layer}'
        ffn = f'{src_pr}.transformer_ffn_layers.{layer}'
        dst = f'{dst_dec}.layers.{layer}'
        both(f'{self_attn}.self_attn.out_proj', f'{dst}.self_attn.out_proj')
        both(f'{self_attn}.norm', f'{dst}.self_attn_layer_norm')
        renames.append(
            (f'{cross}.multihead_attn.in_proj_weight', f'{dst}.cross_attn.in_proj_weight')
        )
        renames.append((f'{cross}.multihead_attn.in_proj_bias', f'{dst}.cross_attn.in_proj_bias'))
        both(f'{cross}.multihead_attn.out_proj', f'{dst}.cross_attn.out_proj')
        both(f'{cross}.norm', f'{dst}.cross_attn_layer_norm')
        both(f'{ffn}.linear1', f'{dst}.fc1')
        both(f'{ffn}.linear2', f'{dst}.fc2')
        both(f'{ffn}.norm', f'{dst}.final_layer_norm')
    both(f'{src_pr}.decoder_norm', f'{dst_dec}.layernorm')
    for i in range(3):
        both(f'{src_pr}.mask_embed.layers.{i}', f'{dst_dec}.mask_predictor.mask_embedder.{i}.0')
    renames.append((f'{src_pr}.query_embed.weight', f'{dst_tm}.queries_embedder.weight'))
    renames.append((f'{src_pr}.query_feat.weight', f'{dst_tm}.queries_features.weight'))
    renames.append((f'{src_pr}.level_embed.weight', f'{dst_tm}.level_embed.weight'))
    both(f'{src_pr}.class_embed', 'class_predictor')

    hf = {dst: d2[src] for src, dst in renames}
    h = sizes.hidden_dim
    for layer in range(sizes.decoder_layers):
        src = f'{src_pr}.transformer_self_attention_layers.{layer}.self_attn'
        dst = f'{dst_dec}.layers.{layer}.self_attn'
        weight, bias = d2[f'{src}.in_proj_weight'], d2[f'{src}.in_proj_bias']
        for index, part in enumerate(('q_proj', 'k_proj', 'v_proj')):
            hf[f'{dst}.{part}.weight'] = weight[index * h : (index + 1) * h]
            hf[f'{dst}.{part}.bias'] = bias[index * h : (index + 1) * h]
    return hf


class GivenFeatures(torch.nn.Module):
    """Stands in for HF's backbone: returns the features the test feeds both implementations."""

    def __init__(self, features: list[torch.Tensor]) -> None:
        super().__init__()
        self.features = features

    def forward(self, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import BackboneOutput

        return BackboneOutput(feature_maps=tuple(self.features))


def hf_model(sizes: D2Sizes, d2: dict, features: list[torch.Tensor]) -> torch.nn.Module:
    """transformers' Mask2FormerForUniversalSegmentation at ``sizes`` with the d2 weights."""
    transformers = pytest.importorskip('transformers', reason='transformers is not installed')
    backbone = transformers.SwinConfig(
        embed_dim=sizes.embed_dim,
        depths=[1] * len(sizes.depths),
        num_heads=[1, 2, 4, 8],
        out_features=['stage1', 'stage2', 'stage3', 'stage4'],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=sizes.num_classes,
        num_queries=sizes.num_queries,
        feature_size=sizes.conv_dim,
        mask_feature_size=sizes.mask_dim,
        hidden_dim=sizes.hidden_dim,
        encoder_layers=sizes.encoder_layers,
        encoder_feedforward_dim=sizes.encoder_ffn,
        decoder_layers=sizes.decoder_layers + 1,  # HF counts as DEC_LAYERS does
        dim_feedforward=sizes.decoder_ffn,
        num_attention_heads=sizes.heads,
        no_object_weight=D2_NO_OBJECT_WEIGHT,
        common_stride=4,
        feature_strides=[4, 8, 16, 32],
        output_auxiliary_logits=True,
    )
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    assert model.model.pixel_level_module.encoder.channels == sizes.channels
    model.model.pixel_level_module.encoder = GivenFeatures(features)
    expected = model.state_dict()
    converted = hf_state_dict_from_d2(d2, sizes)
    # HF keeps its own loss weights (the script does not convert them either): checked below.
    assert set(expected) - set(converted) == {'criterion.empty_weight'}
    assert set(converted) <= set(expected)
    torch.testing.assert_close(expected['criterion.empty_weight'], d2['criterion.empty_weight'])
    model.load_state_dict({**expected, **converted}, strict=True)
    return model


# ----------------------------------------------------------------------------- the comparison


def features_for(sizes: D2Sizes, seed: int = 1) -> list[torch.Tensor]:
    """Backbone outputs at strides 4-32 of a 2 x 3 x 128 x 96 batch (non-square, so that a
    height / width swap shows)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, c, 32 // 2**i, 24 // 2**i, generator=generator)
        for i, c in enumerate(sizes.channels)
    ]


def our_logits(model: torch.nn.Module, sizes: D2Sizes):
    """(class logits, mask logits) of every decoder layer of our model's head."""
    with torch.no_grad():
        return head_of(model)(features_for(sizes), [])


@pytest.fixture(scope='module')
def reference():
    """``reference(name)``: the random d2 weights at :func:`small` sizes and HF's (class logits,
    mask logits) of every decoder layer for them, computed once per module."""
    results = {}

    def get(name: str):
        if name not in results:
            sizes = small(name)
            d2 = d2_state_dict(sizes)
            features = features_for(sizes)
            with torch.no_grad():
                out = hf_model(sizes, d2, features)(pixel_values=torch.zeros(2, 3, 128, 96))
            layers = [*out.auxiliary_logits, out]  # auxiliary: every layer but the last
            classes = [layer['class_queries_logits'] for layer in layers]
            masks = [layer['masks_queries_logits'] for layer in layers]
            results[name] = d2, (classes, masks)
        return results[name]

    return get


# fp32. Measured: bit-identical here (max |difference| 0; logits up to ~15), so 1e-5 leaves room
# for other BLAS / CPUs only.
ATOL, RTOL = 1e-5, 1e-5


@pytest.mark.parametrize('name', list(CONFIGS))
def test_class_and_mask_logits_of_every_layer_equal_transformers(name, shrunk_model, reference):
    sizes = small(name)
    d2, (hf_classes, hf_masks) = reference(name)
    our_classes, our_masks = our_logits(load_converted(shrunk_model(name), name, d2), sizes)
    assert len(our_classes) == len(hf_classes) == sizes.decoder_layers + 1
    for layer, (ours, theirs) in enumerate(zip(our_classes, hf_classes, strict=True)):
        assert ours.shape == (2, sizes.num_queries, sizes.num_classes + 1)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=f'class, layer {layer}')
    for layer, (ours, theirs) in enumerate(zip(our_masks, hf_masks, strict=True)):
        assert ours.shape == (2, sizes.num_queries, 32, 24)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=f'mask, layer {layer}')


def test_the_comparison_sees_a_reversed_level_order(shrunk_model, reference):
    """Reversing the levels of the converted embeddings (where a map would go wrong without any
    shape error) breaks the parity: the test above would catch such a mapping."""
    name, sizes = 'coco-panoptic', small('coco-panoptic')
    d2, (hf_classes, _) = reference(name)
    ours = load_converted(shrunk_model(name), name, d2)
    head = ours.panoptic_head
    with torch.no_grad():
        for embedding in (head.level_embed, head.pixel_decoder.level_encoding):
            embedding.weight.copy_(embedding.weight.flip(0))
    our_classes, _ = our_logits(ours, sizes)
    assert torch.allclose(our_classes[0], hf_classes[0], atol=ATOL, rtol=RTOL)  # before any level
    assert not torch.allclose(our_classes[-1], hf_classes[-1], atol=0.01)


# ----------------------------------------------------------------------------- the backbone


def test_backbone_keys_load_into_dinat_strictly_with_the_same_outputs():
    """d2 ``backbone.*`` after conversion loads strictly into nat_mm's DiNAT (kernel 11, a dilated
    layer) and gives bit for bit what the raw d2 weights give loaded directly, and what the
    independent reference computes from them."""
    sizes = replace(small('coco-panoptic'), depths=(2, 1, 1, 1))
    d2 = d2_state_dict(sizes, seed=3)
    converted = mask2former_to_openmmlab(d2, 'mmdet')
    dilations = [[1, 2], [1], [1], [1]]
    arguments = dict(
        embed_dim=sizes.embed_dim,
        depths=sizes.depths,
        num_heads=sizes.num_heads,
        mlp_ratio=sizes.mlp_ratio,
        kernel_size=sizes.kernel_size,
        dilations=dilations,
        drop_path_rate=0.0,
    )
    via_converter, direct = DiNAT(**arguments).eval(), DiNAT(**arguments).eval()
    load_state_dict_strictly(
        via_converter,
        {k.removeprefix('backbone.'): v for k, v in converted.items() if k.startswith('backbone.')},
        'converted',
    )
    raw_backbone = {
        k.removeprefix('backbone.'): v for k, v in d2.items() if k.startswith('backbone.')
    }
    direct.load_state_dict(raw_backbone, strict=True)
    image = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, reference = via_converter(image), direct(image)
    expected = nat_forward(
        {k: v.double() for k, v in raw_backbone.items()},
        image.double(),
        sizes.num_heads,
        sizes.kernel_size,
        dilations,
        (0, 1, 2, 3),
    )
    for stage, (a, b, c) in enumerate(zip(ours, reference, expected, strict=True)):
        assert torch.equal(a, b), stage
        torch.testing.assert_close(a.double(), c, atol=1e-4, rtol=1e-4, msg=f'stage {stage}')


# ----------------------------------------------------------------------------- strict loading


@pytest.mark.parametrize('name', list(CONFIGS))
def test_full_size_d2_state_dict_fits_our_config_exactly(name):
    """Upstream's full model (DiNAT-L k11, 6 encoder and 9 decoder layers, its queries and classes)
    against the model our config builds, on the meta device (keys and shapes; seconds, not the
    minute a real build takes)."""
    with torch.device('meta'):
        model = build_model(load_config(CONFIG_DIR / CONFIGS[name]))
    converted = mask2former_to_openmmlab(d2_state_dict(FULL[name], device='meta'), HOSTS[name])
    expected = model.state_dict()
    assert sorted(set(expected) - set(converted)) == []  # missing
    assert sorted(set(converted) - set(expected)) == []  # unexpected
    assert [k for k in expected if expected[k].shape != converted[k].shape] == []
    model.load_state_dict(converted, strict=True, assign=True)
    assert sum(v.numel() for v in converted.values()) == pytest.approx(220e6, rel=0.01)


def save_d2_file(path: Path, d2: dict) -> Path:
    """As detectron2's DetectionCheckpointer saves a model (`model` plus trainer state)."""
    torch.save({'model': d2, 'iteration': 737499}, path)
    return path


@pytest.mark.parametrize('name', list(CONFIGS))
def test_converted_d2_file_loads_strictly(name, tmp_path, shrunk_model):
    sizes = small(name)
    path = save_d2_file(tmp_path / 'model_final.pth', d2_state_dict(sizes))
    state_dict = unwrap_state_dict(load_checkpoint(path), path)
    assert is_detectron2_mask2former(state_dict)
    model = shrunk_model(name)
    load_state_dict_strictly(model, mask2former_to_openmmlab(state_dict, HOSTS[name]), path)
    head = head_of(model)
    torch.testing.assert_close(
        head.cls_embed.bias, state_dict['sem_seg_head.predictor.class_embed.bias']
    )


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CONFIGS))
def test_full_size_converted_d2_file_loads_into_our_config(name, tmp_path):
    """The real thing at full size: a 220M-parameter d2 file, read safely, converted, loaded
    strictly into the model our config builds (about a minute and 2.3 GB each on 2 cores)."""
    d2 = d2_state_dict(FULL[name])
    path = save_d2_file(tmp_path / 'model_final.pth', d2)
    del d2
    state_dict = unwrap_state_dict(load_checkpoint(path), path)
    model = build_model(load_config(CONFIG_DIR / CONFIGS[name]))
    load_state_dict_strictly(model, mask2former_to_openmmlab(state_dict, HOSTS[name]), path)


# ----------------------------------------------------------------------------- input and classes


@pytest.mark.parametrize('name', list(CONFIGS))
def test_our_preprocessing_normalises_as_detectron2(name, tmp_path):
    """An image file through our config's loader and data preprocessor equals d2's input:
    ``(RGB - PIXEL_MEAN) / PIXEL_STD`` (d2 reads INPUT.FORMAT 'RGB'; mmcv reads BGR and the
    preprocessor's bgr_to_rgb swaps it)."""
    from PIL import Image

    cfg = load_config(CONFIG_DIR / CONFIGS[name])
    assert cfg.model.data_preprocessor.mean == pytest.approx(D2_PIXEL_MEAN)
    assert cfg.model.data_preprocessor.std == pytest.approx(D2_PIXEL_STD)
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / 'image.png')
    register_library(cfg.default_scope)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        loader = TRANSFORMS.build(cfg.test_dataloader.dataset.pipeline[0])
        preprocessor = MODELS.build(cfg.model.data_preprocessor)
    assert type(loader).__name__ == 'LoadImageFromFile'
    image = loader(dict(img_path=str(tmp_path / 'image.png')))['img']
    ours = preprocessor(dict(inputs=[torch.from_numpy(image).permute(2, 0, 1)]), False)['inputs']

    # d2: read_image(path, format=INPUT.FORMAT), then (x - PIXEL_MEAN) / PIXEL_STD per channel.
    d2_read = rgb if D2_INPUT_FORMAT == 'RGB' else rgb[..., ::-1]
    mean = torch.tensor(D2_PIXEL_MEAN)[:, None, None]
    std = torch.tensor(D2_PIXEL_STD)[:, None, None]
    d2_input = (torch.from_numpy(d2_read.copy()).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(ours[0], d2_input)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_class_count_and_no_object_column_match_detectron2(name):
    """d2's class_embed has NUM_CLASSES + 1 outputs with "no object" last (SetCriterion's
    empty_weight[-1] = NO_OBJECT_WEIGHT); ours has the same count and weights the same column."""
    cfg = load_config(CONFIG_DIR / CONFIGS[name])
    sizes = FULL[name]
    head = cfg.model.panoptic_head if HOSTS[name] == 'mmdet' else cfg.model.decode_head
    if HOSTS[name] == 'mmdet':
        num_classes = head.num_things_classes + head.num_stuff_classes
    else:
        num_classes = head.num_classes
    assert num_classes == sizes.num_classes
    assert head.num_queries == sizes.num_queries
    d2_empty_weight = d2_state_dict(small(name))['criterion.empty_weight']
    assert head.loss_cls.class_weight == pytest.approx(d2_empty_weight.tolist())


def test_the_last_class_column_means_no_object_in_mmdet_and_mmseg(shrunk_model):
    """A converted model whose d2 class layer votes for the last column ("no object" in d2)
    predicts nothing; voting for class 7 predicts class 7: the columns keep their meaning."""
    for name in ('coco-panoptic', 'ade20k-semantic'):
        sizes = small(name)
        features = features_for(sizes)
        for column in (sizes.num_classes, 7):
            d2 = d2_state_dict(sizes)
            bias = torch.zeros(sizes.num_classes + 1)
            bias[column] = 30.0
            d2['sem_seg_head.predictor.class_embed.weight'] = torch.zeros_like(
                d2['sem_seg_head.predictor.class_embed.weight']
            )
            d2['sem_seg_head.predictor.class_embed.bias'] = bias
            model = load_converted(shrunk_model(name), name, d2)
            with torch.no_grad():
                if name == 'ade20k-semantic':
                    metas = [dict(img_shape=(128, 96), pad_shape=(128, 96))] * 2
                    seg_logits = model.decode_head.predict(features, metas, model.test_cfg)
                    if column == 7:
                        assert bool((seg_logits.argmax(1) == 7).all())
                    else:
                        assert float(seg_logits.max()) < 1e-6
                else:
                    classes, masks = model.panoptic_head(features, [])
                    fusion = model.panoptic_fusion_head
                    found = fusion.instance_postprocess(classes[-1][0], masks[-1][0])
                    best = found.scores.argsort(descending=True)[: sizes.num_queries]
                    if column == 7:  # one instance per query, all of class 7
                        assert found.labels[best].tolist() == [7] * sizes.num_queries
                        assert float(found.scores[best].min()) > 0.1
                    else:
                        assert float(found.scores.max()) < 1e-6


# ----------------------------------------------------------------------------- bad input


def test_detects_d2_state_dicts_only():
    sizes = small('coco-instance')
    d2 = d2_state_dict(sizes)
    assert is_detectron2_mask2former(d2)
    assert not is_detectron2_mask2former(mask2former_to_openmmlab(d2, 'mmdet'))
    assert not is_detectron2_mask2former({'patch_embed.proj.0.weight': torch.zeros(1)})


def test_every_key_is_mapped_or_dropped_by_name(monkeypatch):
    d2 = d2_state_dict(small('ade20k-semantic'))
    logged = []
    monkeypatch.setattr(d2_convert, 'print_log', lambda message, **_: logged.append(message))
    converted = mask2former_to_openmmlab(d2, 'mmseg')
    assert len(converted) == len(d2) - 1
    assert all(key.startswith(('backbone.', 'decode_head.')) for key in converted)
    assert len(logged) == 1 and 'criterion.empty_weight' in logged[0]

    bad = {
        **d2,
        'sem_seg_head.predictor.static_query.weight': torch.zeros(8, 64),
        'backbone.levels.0.blocks.0.attn.relative_position_bias_table': torch.zeros(1),
        'pixel_mean': torch.zeros(3),
    }
    with pytest.raises(NatMMError) as error:
        mask2former_to_openmmlab(bad, 'mmseg')
    message = str(error.value)
    assert message.startswith('3 keys of the detectron2 Mask2Former checkpoint')
    for key in ('static_query', 'relative_position_bias_table', 'pixel_mean'):
        assert key in message


def test_bad_host_and_non_d2_input_are_named():
    d2 = d2_state_dict(small('coco-instance'))
    with pytest.raises(NatMMError, match=r"host must be 'mmdet' or 'mmseg', got 'mmdet3' \(host\)"):
        mask2former_to_openmmlab(d2, 'mmdet3')
    with pytest.raises(NatMMError, match='not a detectron2 Mask2Former'):
        mask2former_to_openmmlab({'backbone.patch_embed.norm.weight': torch.ones(2)}, 'mmdet')
