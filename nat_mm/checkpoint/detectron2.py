"""detectron2 Mask2Former checkpoints (upstream's DiNAT-L models) -> mmdet 3.x / mmseg 1.x.

Upstream trained Mask2Former DiNAT-L with detectron2 (facebookresearch/Mask2Former plus the NAT
repo's `mask2former/dinat.py` backbone). Its state dict has three parts:

- ``backbone.*``: the d2 DiNAT wrapper, whose modules carry the original names (docs/
  original-models.md section 1), hence nat_mm's: kept as they are (names checked);
- ``sem_seg_head.pixel_decoder.*``: ``MSDeformAttnPixelDecoder`` -> mmdet's
  ``MSDeformAttnPixelDecoder``;
- ``sem_seg_head.predictor.*``: ``MultiScaleMaskedTransformerDecoder`` -> mmdet's
  ``Mask2FormerHead`` and its ``Mask2FormerTransformerDecoder``;

plus :data:`DROPPED_KEYS`, which have no counterpart. Both sides order the feature levels from
the lowest resolution (res5) up, in the pixel decoder's input projections and level embedding and
in the decoder's level embedding, so no level is reordered; q/k/v stay packed (both use
``nn.MultiheadAttention``'s ``in_proj_*``); the class layer keeps its ``num_classes + 1`` rows
with "no object" last, as mmdet / mmseg expect. docs/checkpoints.md has the table;
tests/test_detectron2_mask2former.py proves it against HuggingFace transformers' Mask2Former.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from mmengine.logging import print_log

from nat_mm.errors import NatMMError

# The head's name in the model, per host library.
HEAD_PREFIXES = {'mmdet': 'panoptic_head.', 'mmseg': 'decode_head.'}

# d2 keys without a counterpart, and why dropping them loses nothing.
DROPPED_KEYS = {
    'criterion.empty_weight': (
        "the loss's class weights [1] * num_classes + [no-object weight] (a buffer of d2's "
        "SetCriterion); mmdet / mmseg take them from the config's loss_cls.class_weight"
    ),
}

_D2_HEAD = 'sem_seg_head.'
_PIXEL_DECODER = 'sem_seg_head.pixel_decoder.'
_PREDICTOR = 'sem_seg_head.predictor.'
_PARAM = r'(weight|bias)'
# Indices as d2 writes them (ASCII digits, no leading zero): `\d+` also read '01' or a non-ASCII
# digit as 1, so a misspelt key was renamed onto the real one's target (two keys: the last won).
_INDEX = r'(0|[1-9][0-9]*)'
_LEVEL = r'([1-9][0-9]*)'  # d2's adapter_{k} / layer_{k} count from 1

# The d2 DiNAT wrapper's parameter names (= nat_mm's); anything else under backbone. is an error.
_BACKBONE_KEY = re.compile(
    r'backbone\.('
    rf'patch_embed\.proj\.[01]\.{_PARAM}|patch_embed\.norm\.{_PARAM}'
    rf'|levels\.{_INDEX}\.blocks\.{_INDEX}\.'
    rf'(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{_PARAM}'
    rf'|levels\.{_INDEX}\.blocks\.{_INDEX}\.(attn\.rpb|gamma1|gamma2)'
    rf'|levels\.{_INDEX}\.downsample\.reduction\.weight'
    rf'|levels\.{_INDEX}\.downsample\.norm\.{_PARAM}'
    rf'|norm{_INDEX}\.{_PARAM}'
    r')'
)

# (d2 pattern after sem_seg_head.pixel_decoder., mmdet name after pixel_decoder.). d2 runs
# input_proj / level_embed from res5 down to res3, as mmdet's input_convs / level_encoding do.
# `adapter_k` / `layer_k` (d2 Conv2d + norm) act on backbone level k-1 (res{k+1}), as mmdet's
# lateral_convs[k-1] / output_convs[k-1] (ConvModule: conv + gn) in its forward.
_ENCODER = rf'transformer\.encoder\.layers\.{_INDEX}\.'
_MSDA = r'(sampling_offsets|attention_weights|value_proj|output_proj)'  # same in mmcv
_PIXEL_DECODER_RULES = [
    (rf'input_proj\.{_INDEX}\.0\.{_PARAM}', r'input_convs.\1.conv.\2'),
    (rf'input_proj\.{_INDEX}\.1\.{_PARAM}', r'input_convs.\1.gn.\2'),  # GroupNorm(32)
    (r'transformer\.level_embed', r'level_encoding.weight'),  # Parameter -> nn.Embedding
    (rf'{_ENCODER}self_attn\.{_MSDA}\.{_PARAM}', r'encoder.layers.\1.self_attn.\2.\3'),
    (rf'{_ENCODER}norm1\.{_PARAM}', r'encoder.layers.\1.norms.0.\2'),
    (rf'{_ENCODER}linear1\.{_PARAM}', r'encoder.layers.\1.ffn.layers.0.0.\2'),
    (rf'{_ENCODER}linear2\.{_PARAM}', r'encoder.layers.\1.ffn.layers.1.\2'),
    (rf'{_ENCODER}norm2\.{_PARAM}', r'encoder.layers.\1.norms.1.\2'),
    (rf'mask_features\.{_PARAM}', r'mask_feature.\1'),
    (rf'adapter_{_LEVEL}\.{_PARAM}', lambda m: f'lateral_convs.{int(m[1]) - 1}.conv.{m[2]}'),
    (rf'adapter_{_LEVEL}\.norm\.{_PARAM}', lambda m: f'lateral_convs.{int(m[1]) - 1}.gn.{m[2]}'),
    (rf'layer_{_LEVEL}\.{_PARAM}', lambda m: f'output_convs.{int(m[1]) - 1}.conv.{m[2]}'),
    (rf'layer_{_LEVEL}\.norm\.{_PARAM}', lambda m: f'output_convs.{int(m[1]) - 1}.gn.{m[2]}'),
]

# (d2 pattern after sem_seg_head.predictor., mmdet name after the head prefix). A d2 decoder layer
# is three modules (cross-attention, self-attention, FFN, each with its post-norm); mmdet's
# Mask2FormerTransformerDecoderLayer runs the same order with norms.0 / 1 / 2.
_ATTN = r'(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)'
_CROSS = rf'transformer_cross_attention_layers\.{_INDEX}\.'
_SELF = rf'transformer_self_attention_layers\.{_INDEX}\.'
_FFN = rf'transformer_ffn_layers\.{_INDEX}\.'
_LAYER = r'transformer_decoder.layers.\1.'
_PREDICTOR_RULES = [
    (rf'{_CROSS}multihead_attn\.{_ATTN}', rf'{_LAYER}cross_attn.attn.\2'),
    (rf'{_CROSS}norm\.{_PARAM}', rf'{_LAYER}norms.0.\2'),
    (rf'{_SELF}self_attn\.{_ATTN}', rf'{_LAYER}self_attn.attn.\2'),
    (rf'{_SELF}norm\.{_PARAM}', rf'{_LAYER}norms.1.\2'),
    (rf'{_FFN}linear1\.{_PARAM}', rf'{_LAYER}ffn.layers.0.0.\2'),
    (rf'{_FFN}linear2\.{_PARAM}', rf'{_LAYER}ffn.layers.1.\2'),
    (rf'{_FFN}norm\.{_PARAM}', rf'{_LAYER}norms.2.\2'),
    (rf'decoder_norm\.{_PARAM}', r'transformer_decoder.post_norm.\1'),
    (r'(query_feat|query_embed|level_embed)\.weight', r'\1.weight'),
    # Only where the pixel decoder's width differs from the decoder's (not in the published models).
    (rf'input_proj\.{_INDEX}\.{_PARAM}', r'decoder_input_projs.\1.\2'),
    (rf'class_embed\.{_PARAM}', r'cls_embed.\1'),  # num_classes + 1 rows, "no object" last
    # d2's MLP keeps its Linear layers in a list; mmdet's nn.Sequential interleaves ReLUs.
    (rf'mask_embed\.layers\.{_INDEX}\.{_PARAM}', lambda m: f'mask_embed.{2 * int(m[1])}.{m[2]}'),
]


def is_detectron2_mask2former(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is a detectron2 (Mask)Former model: keys under ``sem_seg_head.``."""
    return any(key.startswith(_D2_HEAD) for key in state_dict)


def _rename(rest: str, rules: list) -> str | None:
    """The mmdet name of ``rest`` by the first rule that matches all of it, or None. A rule's
    target is a ``re`` template, or a function of the match where an index changes."""
    for pattern, target in rules:
        if match := re.fullmatch(pattern, rest):
            return match.expand(target) if isinstance(target, str) else target(match)
    return None


def mask2former_to_openmmlab(
    state_dict: Mapping[str, torch.Tensor], host: str
) -> dict[str, torch.Tensor]:
    """Renames a detectron2 Mask2Former + DiNAT state dict to mmdet's / mmseg's model.

    Args:
        state_dict: The d2 model's state dict (a file's ``model`` entry, without ``module.``).
        host: 'mmdet' (mmdet ``Mask2Former``, head ``panoptic_head``) or 'mmseg' (mmseg
            ``EncoderDecoder`` with ``Mask2FormerHead``, head ``decode_head``).

    Returns:
        The state dict of the host's model, tensors unchanged. :data:`DROPPED_KEYS` found in the
        file are logged by name.

    Raises:
        NatMMError: ``host`` is not 'mmdet' / 'mmseg', the state dict is not a d2 Mask2Former,
            or it holds keys that are neither mapped nor dropped (all listed).
    """
    if host not in HEAD_PREFIXES:
        raise NatMMError(f"host must be 'mmdet' or 'mmseg', got {host!r}", 'host')
    if not is_detectron2_mask2former(state_dict):
        raise NatMMError(
            'not a detectron2 Mask2Former state dict: no key starts with "sem_seg_head."',
            'state_dict',
        )
    head = HEAD_PREFIXES[host]
    converted: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, value in state_dict.items():
        if key in DROPPED_KEYS:
            dropped.append(key)
            continue
        new_key = None
        if _BACKBONE_KEY.fullmatch(key):
            new_key = key
        elif key.startswith(_PIXEL_DECODER):
            name = _rename(key.removeprefix(_PIXEL_DECODER), _PIXEL_DECODER_RULES)
            new_key = None if name is None else f'{head}pixel_decoder.{name}'
        elif key.startswith(_PREDICTOR):
            name = _rename(key.removeprefix(_PREDICTOR), _PREDICTOR_RULES)
            new_key = None if name is None else f'{head}{name}'
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise NatMMError(
            f'{len(unknown)} keys of the detectron2 Mask2Former checkpoint have no mmdet / mmseg '
            f'counterpart (DiNAT backbone, MSDeformAttn pixel decoder and masked-attention '
            f'decoder are supported): {", ".join(sorted(unknown))}',
            'state_dict',
        )
    for key in dropped:
        print_log(
            f'detectron2 checkpoint: dropped {key} ({DROPPED_KEYS[key]})',
            logger='current',
            level=logging.INFO,
        )
    return converted
