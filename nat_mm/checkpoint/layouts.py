"""The three checkpoint layouts of NAT / DiNAT weights and the converters between them.

- ``original``: the upstream layout, which nat_mm uses as is (flat, or under ``model`` /
  ``state_dict``); ImageNet files add ``norm.*`` and ``head.*``.
- ``mmdet``: downstream mmdet / mmseg checkpoints: ``state_dict`` with ``backbone.`` prefixes.
- ``huggingface``: transformers' ``Nat*`` / ``Dinat*`` models (``pytorch_model.bin`` or
  ``model.safetensors``, file or folder), optionally prefixed ``nat.`` / ``dinat.``.

A ``module.`` prefix (DDP) is removed first. The layouts are described in
docs/original-models.md section 1. DiNAT_s (:class:`~nat_mm.models.DiNATs`) keeps upstream's own
names (``patch_embed.proj``, ``layers.{i}``; section 5), so its original and mmdet files load as
they are; transformers has no DiNAT_s, hence no HuggingFace layout for it.
"""

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from nat_mm.errors import NatMMError

FORMATS = ('original', 'mmdet', 'huggingface')

# HuggingFace module path -> nat_mm module path, inside one layer (encoder.levels.i.layers.j).
_HF_LAYER_MODULES = {
    'layernorm_before': 'norm1',
    'attention.self': 'attn',  # holds `rpb`; query/key/value are merged into attn.qkv
    'attention.output.dense': 'attn.proj',
    'layernorm_after': 'norm2',
    'intermediate.dense': 'mlp.fc1',
    'output.dense': 'mlp.fc2',
}
# HuggingFace module path -> nat_mm module path, outside the layers (after the model prefix).
_HF_TOP_MODULES = {
    'embeddings.patch_embeddings.projection.0': 'patch_embed.proj.0',
    'embeddings.patch_embeddings.projection.1': 'patch_embed.proj.1',
    'embeddings.norm': 'patch_embed.norm',
    'layernorm': 'norm',
    'classifier': 'head',
}
_HF_QKV = ('query', 'key', 'value')
_HF_LAYER_KEY = re.compile(r'encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)')
_HF_DOWNSAMPLE_KEY = re.compile(r'encoder\.levels\.(\d+)\.downsample\.(.+)')
_HF_STAGE_NORM_KEY = re.compile(r'hidden_states_norms\.stage(\d+)\.(.+)')
_NATMM_LAYER_KEY = re.compile(r'levels\.(\d+)\.blocks\.(\d+)\.(.+)')
_NATMM_DOWNSAMPLE_KEY = re.compile(r'levels\.(\d+)\.downsample\.(.+)')
_NATMM_STAGE_NORM_KEY = re.compile(r'norm(\d+)\.(.+)')
_HF_MARKER = 'embeddings.patch_embeddings.projection.0.weight'
# The stem's first weight in nat_mm's (= upstream's) layout: NAT / DiNAT, DiNAT_s.
NATMM_MARKERS = ('patch_embed.proj.0.weight', 'patch_embed.proj.weight')


def unwrap_state_dict(checkpoint: object, source: object = None) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint object: the object itself, or its ``state_dict`` or
    ``model`` entry, with ``module.`` (DDP) prefixes removed as mmengine removes them.

    Args:
        checkpoint: What :func:`nat_mm.checkpoint.load_checkpoint` returned.
        source: The file it came from, for error messages.

    Raises:
        NatMMError: No mapping of tensors found, both wrappers (which one is the model's would
            be a guess), keys that are not strings, or a key both with and without ``module.``.
    """
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):
        wrappers = [
            key for key in ('state_dict', 'model') if isinstance(checkpoint.get(key), Mapping)
        ]
        if len(wrappers) == 2:
            raise NatMMError(
                'the checkpoint holds both a "state_dict" and a "model" entry: which one holds '
                'the weights would be a guess; keep one',
                source,
            )
        state_dict = checkpoint[wrappers[0]] if wrappers else checkpoint
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else '-'
        raise NatMMError(
            'checkpoint must be a state dict of tensors, or hold one under "state_dict" or '
            f'"model"; it holds a {type(checkpoint).__name__} with keys {keys}',
            source,
        )
    if not_strings := [key for key in state_dict if not isinstance(key, str)]:
        raise NatMMError(f'state dict keys must be strings, got {not_strings[:8]}', source)
    unwrapped = {key.removeprefix('module.'): value for key, value in state_dict.items()}
    if len(unwrapped) < len(state_dict):  # 'module.x' and 'x': one would replace the other
        both = sorted(key for key in state_dict if f'module.{key}' in state_dict)
        raise NatMMError(
            f'{len(both)} keys appear both with and without the "module." prefix (which one to '
            f'load would be a guess): {", ".join(both)}',
            source,
        )
    return unwrapped


# ----------------------------------------------------------------------------- layouts


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Returns 'huggingface', 'mmdet' (``backbone.`` prefixes) or 'original'."""
    if any(key.endswith(_HF_MARKER) for key in state_dict):
        return 'huggingface'
    if any(key.startswith('backbone.') for key in state_dict):
        return 'mmdet'
    return 'original'


def _hf_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The model prefix of a HuggingFace state dict: '', 'nat.' or 'dinat.' (any other too)."""
    marker_key = next(key for key in state_dict if key.endswith(_HF_MARKER))
    return marker_key[: -len(_HF_MARKER)]


def huggingface_to_natmm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a HuggingFace NAT/DiNAT state dict to the nat_mm (= upstream) layout.

    query/key/value are stacked into ``qkv`` (rows 0:C, C:2C, 2C:3C), ``layer_scale_parameters``
    [2, C] becomes ``gamma1``/``gamma2``, ``hidden_states_norms.stage{n}`` becomes ``norm{n-1}``.

    Raises:
        ValueError: A key that is not part of the HuggingFace layout.
    """
    prefix = _hf_prefix(state_dict)
    converted: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, value in state_dict.items():
        key = full_key[len(prefix) :] if full_key.startswith(prefix) else full_key
        if match := _HF_LAYER_KEY.fullmatch(key):
            stage, layer, rest = match.groups()
            natmm_layer = f'levels.{stage}.blocks.{layer}'
            if rest == 'layer_scale_parameters':
                converted[f'{natmm_layer}.gamma1'] = value[0]
                converted[f'{natmm_layer}.gamma2'] = value[1]
                continue
            module, param = rest.rsplit('.', 1)
            if module.startswith('attention.self.') and module.split('.')[-1] in _HF_QKV:
                part = module.split('.')[-1]
                qkv_parts.setdefault(f'{natmm_layer}.attn.qkv.{param}', {})[part] = value
                continue
            if module in _HF_LAYER_MODULES:
                converted[f'{natmm_layer}.{_HF_LAYER_MODULES[module]}.{param}'] = value
                continue
        elif match := _HF_DOWNSAMPLE_KEY.fullmatch(key):
            converted[f'levels.{match[1]}.downsample.{match[2]}'] = value
            continue
        elif match := _HF_STAGE_NORM_KEY.fullmatch(key):
            converted[f'norm{int(match[1]) - 1}.{match[2]}'] = value
            continue
        elif '.' in key and key.rsplit('.', 1)[0] in _HF_TOP_MODULES:
            module, param = key.rsplit('.', 1)
            converted[f'{_HF_TOP_MODULES[module]}.{param}'] = value
            continue
        raise NatMMError(f'unknown key {full_key!r} in a HuggingFace NAT/DiNAT checkpoint')
    for key, parts in qkv_parts.items():
        if set(parts) != set(_HF_QKV):
            raise NatMMError(f'{key}: HuggingFace checkpoint lacks {set(_HF_QKV) - set(parts)}')
        converted[key] = torch.cat([parts[name] for name in _HF_QKV], dim=0)
    return converted


def natmm_to_huggingface(
    state_dict: Mapping[str, torch.Tensor], prefix: str = 'nat.'
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`huggingface_to_natmm`; ``prefix`` goes before embeddings, encoder and
    layernorm ('nat.'/'dinat.' for the classification models, '' for ``*Backbone``/``*Model``).

    Raises:
        ValueError: A key that is not part of the nat_mm layout.
    """
    if NATMM_MARKERS[1] in state_dict:
        raise NatMMError(
            'a DiNAT_s checkpoint has no HuggingFace layout (transformers implements NAT and '
            'DiNAT only); convert it to the original or mmdet layout'
        )
    layer_modules = {natmm: hf for hf, natmm in _HF_LAYER_MODULES.items()}
    top_modules = {natmm: hf for hf, natmm in _HF_TOP_MODULES.items()}
    # The classifier sits outside the base model, hence without prefix.
    top_prefix = {'head': ''}
    converted: dict[str, torch.Tensor] = {}
    gammas: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := _NATMM_LAYER_KEY.fullmatch(key):
            stage, layer, rest = match.groups()
            hf_layer = f'{prefix}encoder.levels.{stage}.layers.{layer}'
            if rest in ('gamma1', 'gamma2'):
                gammas.setdefault(f'{hf_layer}.layer_scale_parameters', {})[rest] = value
                continue
            module, param = rest.rsplit('.', 1)
            if module == 'attn.qkv':
                for name, part in zip(_HF_QKV, value.chunk(3, dim=0), strict=True):
                    converted[f'{hf_layer}.attention.self.{name}.{param}'] = part.clone()
                continue
            if module in layer_modules:
                converted[f'{hf_layer}.{layer_modules[module]}.{param}'] = value
                continue
        elif match := _NATMM_DOWNSAMPLE_KEY.fullmatch(key):
            converted[f'{prefix}encoder.levels.{match[1]}.downsample.{match[2]}'] = value
            continue
        elif match := _NATMM_STAGE_NORM_KEY.fullmatch(key):
            converted[f'hidden_states_norms.stage{int(match[1]) + 1}.{match[2]}'] = value
            continue
        elif '.' in key and key.rsplit('.', 1)[0] in top_modules:
            module, param = key.rsplit('.', 1)
            module_prefix = top_prefix.get(module, prefix)
            converted[f'{module_prefix}{top_modules[module]}.{param}'] = value
            continue
        raise NatMMError(f'unknown key {key!r} in a nat_mm / original NAT checkpoint')
    for key, parts in gammas.items():
        converted[key] = torch.stack([parts['gamma1'], parts['gamma2']])
    return converted


def to_natmm(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list]:
    """Converts any recognised layout to nat_mm's.

    Returns:
        The converted state dict, the detected format, and the keys that were dropped because they
        belong to another part of a downstream model (neck, heads, ...).
    """
    source_format = detect_format(state_dict)
    if source_format == 'huggingface':
        return huggingface_to_natmm(state_dict), source_format, []
    if source_format == 'mmdet':
        backbone = {
            k[len('backbone.') :]: v for k, v in state_dict.items() if k.startswith('backbone.')
        }
        others = sorted(k for k in state_dict if not k.startswith('backbone.'))
        return backbone, source_format, others
    return dict(state_dict), source_format, []


def from_natmm(
    state_dict: Mapping[str, torch.Tensor], target_format: str, hf_prefix: str = 'nat'
) -> dict[str, object]:
    """Converts a nat_mm state dict to ``target_format`` (one of :data:`FORMATS`).

    Args:
        state_dict: nat_mm / original layout.
        target_format: One of :data:`FORMATS`.
        hf_prefix: HuggingFace model prefix ('nat', 'dinat', or '' for the ``*Backbone`` layout).

    Returns:
        The object to save: a flat state dict ('original', 'huggingface') or
        ``{'state_dict': ...}`` with ``backbone.`` prefixes ('mmdet').
    """
    if target_format == 'original':
        return dict(state_dict)
    if target_format == 'mmdet':
        return {'state_dict': {f'backbone.{k}': v for k, v in state_dict.items()}}
    if target_format == 'huggingface':
        if hf_prefix and not hf_prefix.endswith('.'):
            hf_prefix += '.'
        return natmm_to_huggingface(state_dict, hf_prefix)
    raise NatMMError(
        f'target_format must be one of {FORMATS}, got {target_format!r}', 'target_format'
    )


def rpb_kernel_size(shape: tuple[int, ...]) -> int | None:
    """K' of an RPB table of shape [heads, 2K'-1, 2K'-1] with odd K' >= 3, else None."""
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 2 == 0:
        return None
    kernel_size = (shape[1] + 1) // 2
    return kernel_size if kernel_size >= 3 and kernel_size % 2 == 1 else None


def resize_rpb(table: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Bicubically resizes an RPB table [heads, 2K'-1, 2K'-1] to [heads, 2K-1, 2K-1].

    Same call as Swin's window-size change (``F.interpolate(..., mode='bicubic')``, corners not
    aligned), which upstream used for ``dinat_large_in22k_224_11x11interp.pth``.

    Raises:
        NatMMError: ``table`` is not [heads, 2K'-1, 2K'-1] for an odd K' >= 3.
    """
    if rpb_kernel_size(tuple(table.shape)) is None:
        raise NatMMError(
            "an RPB table must have shape [heads, 2K'-1, 2K'-1] for an odd kernel size "
            f"K' >= 3 (sides 5, 9, 13, ...), got {list(table.shape)}",
            'rpb',
        )
    side = 2 * kernel_size - 1
    # Half precision has no CPU bicubic kernel: compute in at least float32.
    work_dtype = torch.promote_types(table.dtype, torch.float32)
    resized = F.interpolate(table[None].to(work_dtype), size=(side, side), mode='bicubic')
    return resized[0].to(table.dtype)
