"""Reading, converting and strictly loading NAT / DiNAT checkpoints.

Three layouts are recognised automatically (one converter each, used by :meth:`NAT.init_weights`
and ``tools/convert_checkpoint.py``):

- ``original``: the upstream layout, which nat_mm uses as is (flat, or under ``model`` /
  ``state_dict``); ImageNet files add ``norm.*`` and ``head.*``.
- ``mmdet``: downstream mmdet / mmseg checkpoints: ``state_dict`` with ``backbone.`` prefixes.
- ``huggingface``: transformers' ``Nat*`` / ``Dinat*`` models (``pytorch_model.bin`` or
  ``model.safetensors``, file or folder), optionally prefixed ``nat.`` / ``dinat.``.

A ``module.`` prefix (DDP) is removed first. RPB tables are resized bicubically when the kernel
differs (the call Swin and upstream's ``dinat_large_in22k_224_11x11interp.pth`` use).
"""

import hashlib
import io
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from urllib.parse import urlparse

import safetensors.torch
import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from torch import nn

FORMATS = ('original', 'mmdet', 'huggingface')
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')

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


# ----------------------------------------------------------------------------- reading files


def _torch_load(path: str) -> object:
    """torch.load with weights_only=True; falls back (with a warning) for pickled metadata."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        warnings.warn(
            f'{path} holds objects other than tensors ({str(error).splitlines()[0]}); loading it '
            f'with weights_only=False. Only do this for checkpoints you trust.',
            stacklevel=3,
        )
        return torch.load(path, map_location='cpu', weights_only=False)


def _download(url: str) -> str:
    """Downloads ``url`` once into torch's hub cache; the name carries a hash of the URL, so two
    HuggingFace files both called ``model.safetensors`` do not collide."""
    name = os.path.basename(urlparse(url).path) or 'checkpoint'
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    cache_dir = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f'{digest}-{name}')
    if not os.path.exists(path):
        print_log(f'Downloading {url} to {path}', logger='current')
        torch.hub.download_url_to_file(url, path, progress=False)
    return path


def read_checkpoint(source: str | os.PathLike) -> object:
    """Reads a checkpoint object from a file, a HuggingFace folder or a URL.

    Args:
        source: Local ``.pth``/``.pt``/``.bin``/``.safetensors`` file; a folder holding
            ``model.safetensors`` or ``pytorch_model.bin``; an ``http(s)://`` URL of such a file;
            or any other scheme mmengine's ``CheckpointLoader`` knows (``open-mmlab://``, ...).

    Returns:
        What the file holds: a state dict, or a dict wrapping one.

    Raises:
        FileNotFoundError: Nothing readable at ``source``.
    """
    source = str(source)
    if source.startswith(('http://', 'https://')):
        path = _download(source)
    elif '://' in source:
        return CheckpointLoader.load_checkpoint(source, map_location='cpu')
    else:
        path = source
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in HF_WEIGHT_FILES]
        existing = [candidate for candidate in candidates if os.path.isfile(candidate)]
        if not existing:
            raise FileNotFoundError(
                f'checkpoint folder {source!r} holds none of {list(HF_WEIGHT_FILES)}'
            )
        path = existing[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint={source!r} does not exist')
    if path.endswith('.safetensors'):
        return safetensors.torch.load_file(path, device='cpu')
    return _torch_load(path)


def unwrap_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """Returns the state dict of a checkpoint object: the object itself, or its ``state_dict`` or
    ``model`` entry, without a leading ``module.`` (DDP) prefix.

    Raises:
        TypeError: No mapping of tensors found.
    """
    state_dict = checkpoint
    for wrapper_key in ('state_dict', 'model'):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper_key), Mapping):
            state_dict = state_dict[wrapper_key]
            break
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise TypeError(
            'checkpoint must be a state dict of tensors, or hold one under "state_dict" or '
            f'"model"; got {type(checkpoint).__name__} with keys '
            f'{list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else "-"}'
        )
    if state_dict and all(key.startswith('module.') for key in state_dict):
        state_dict = {key[len('module.') :]: value for key, value in state_dict.items()}
    return dict(state_dict)


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
        raise ValueError(f'unknown key {full_key!r} in a HuggingFace NAT/DiNAT checkpoint')
    for key, parts in qkv_parts.items():
        if set(parts) != set(_HF_QKV):
            raise ValueError(f'{key}: HuggingFace checkpoint lacks {set(_HF_QKV) - set(parts)}')
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
        raise ValueError(f'unknown key {key!r} in a nat_mm / original NAT checkpoint')
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
    raise ValueError(f'target_format={target_format!r}; expected one of {FORMATS}')


def resize_rpb(table: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Bicubically resizes an RPB table [heads, 2K'-1, 2K'-1] to [heads, 2K-1, 2K-1].

    Same call as Swin's window-size change (``F.interpolate(..., mode='bicubic')``, corners not
    aligned), which upstream used for ``dinat_large_in22k_224_11x11interp.pth``.
    """
    side = 2 * kernel_size - 1
    # Half precision has no CPU bicubic kernel: compute in at least float32.
    work_dtype = torch.promote_types(table.dtype, torch.float32)
    resized = F.interpolate(table[None].to(work_dtype), size=(side, side), mode='bicubic')
    return resized[0].to(table.dtype)


# ----------------------------------------------------------------------------- strict loading

_OUTPUT_NORM = re.compile(r'norm\d+\.')
_MAX_LISTED_KEYS = 20


def _format_keys(title: str, keys: list[str]) -> str:
    listed = keys[:_MAX_LISTED_KEYS]
    more = f'\n  ... and {len(keys) - len(listed)} more' if len(keys) > len(listed) else ''
    return f'{title} ({len(keys)}):\n  ' + '\n  '.join(listed) + more


def _is_ignorable(key: str) -> bool:
    """Keys a backbone legitimately ignores: the classifier (``head``, final ``norm``) and the
    output norm of a stage the backbone does not return."""
    return key.startswith(('head.', 'norm.')) or bool(_OUTPUT_NORM.match(key))


def load_backbone_checkpoint(model: nn.Module, source: str | os.PathLike) -> str:
    """Loads a checkpoint of any recognised format into a NAT/DiNAT backbone, strictly.

    Output norms (``norm{i}``) may be absent from the file only when it has none at all (ImageNet
    checkpoints); they then keep their initialisation, as upstream. Ignored keys are logged.

    Args:
        model: The backbone.
        source: See :func:`read_checkpoint`.

    Returns:
        The detected format.

    Raises:
        ValueError: Missing, unexpected or mis-shaped backbone keys, all listed in one message.
    """
    raw = unwrap_state_dict(read_checkpoint(source))
    state_dict, source_format, dropped = to_natmm(raw)
    expected = model.state_dict()
    has_output_norms = any(_OUTPUT_NORM.match(key) for key in state_dict)
    for key, value in list(state_dict.items()):
        target = expected.get(key)
        if (
            key.endswith('attn.rpb')
            and target is not None
            and value.ndim == 3
            and value.shape[0] == target.shape[0]
            and value.shape[1:] != target.shape[1:]
        ):
            kernel_size = (target.shape[-1] + 1) // 2
            print_log(
                f'{key}: resizing RPB {tuple(value.shape)} -> {tuple(target.shape)}',
                logger='current',
            )
            state_dict[key] = resize_rpb(value, kernel_size)

    missing = [
        key
        for key in expected
        if key not in state_dict and (has_output_norms or not _OUTPUT_NORM.match(key))
    ]
    kept_init = [key for key in expected if key not in state_dict and key not in missing]
    unexpected = [key for key in state_dict if key not in expected and not _is_ignorable(key)]
    ignored = dropped + [key for key in state_dict if key not in expected and _is_ignorable(key)]
    mismatched = [
        f'{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}'
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            _format_keys(title, keys)
            for title, keys in (
                ('missing in checkpoint', missing),
                ('unexpected in checkpoint', unexpected),
                ('shape mismatch', mismatched),
            )
            if keys
        ]
        raise ValueError(
            f'checkpoint {str(source)!r} ({source_format} format) does not fit '
            f'{type(model).__name__}:\n' + '\n'.join(problems)
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    print_log(
        f'Loaded {source_format} checkpoint {str(source)!r} into {type(model).__name__}; '
        f'ignored {len(ignored)} keys not used by the backbone {ignored[:6]}'
        f'{"..." if len(ignored) > 6 else ""}; kept the initialisation of {kept_init}',
        logger='current',
    )
    return source_format


# ----------------------------------------------------------------------------- file conversion


def convert_checkpoint(
    source: str | os.PathLike, target_format: str, hf_prefix: str = 'nat'
) -> tuple[dict[str, object], str, list[str]]:
    """Reads ``source`` (any recognised format) and converts it to ``target_format``.

    Returns:
        The object to save (see :func:`from_natmm`), the source format, and the keys dropped
        because they belong to another part of a downstream model.
    """
    if target_format not in FORMATS:
        raise ValueError(f'target_format={target_format!r}; expected one of {FORMATS}')
    state_dict, source_format, dropped = to_natmm(unwrap_state_dict(read_checkpoint(source)))
    if 'patch_embed.proj.0.weight' not in state_dict:
        raise ValueError(
            f'{str(source)!r} is not a NAT/DiNAT checkpoint: no patch_embed.proj.0.weight after '
            f'conversion from the {source_format} layout; first keys: {list(state_dict)[:5]}'
        )
    return from_natmm(state_dict, target_format, hf_prefix), source_format, dropped


def save_checkpoint_file(checkpoint: Mapping[str, object], path: str | os.PathLike) -> str:
    """Writes a converted checkpoint atomically: safetensors for ``*.safetensors`` paths or
    folders (``model.safetensors`` inside, as HuggingFace), torch.save otherwise.

    Returns:
        The path of the written file.
    """
    # Imported here: nat_mm.engine is only needed when writing files.
    from nat_mm.engine import atomic_write_bytes

    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(('/', os.sep)):
        path = os.path.join(path, HF_WEIGHT_FILES[0])
    if path.endswith('.safetensors'):
        if not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            raise ValueError(
                f'{path}: safetensors holds a flat state dict only; write the mmdet layout to '
                f'a .pth file'
            )
        tensors = {key: value.contiguous() for key, value in checkpoint.items()}
        data = safetensors.torch.save(tensors)
    else:
        buffer = io.BytesIO()
        torch.save(dict(checkpoint), buffer)
        data = buffer.getvalue()
    atomic_write_bytes(data, path)
    return path
