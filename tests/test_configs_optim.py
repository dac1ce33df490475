"""NATOptimWrapperConstructor: zero weight decay on norms and `rpb`, custom lr multipliers kept."""

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from nat_mm.models import NAT
from nat_mm.optim import no_decay_parameter_ids

BASE_LR = 1e-4
BASE_WD = 0.05


class TinySegmentor(nn.Module):
    """A NAT backbone plus a head with BatchNorm, GroupNorm and a LayerNorm named `post_ln`."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = NAT(
            embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0
        )
        self.head = nn.Sequential(
            nn.Conv2d(128, 8, 1), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Conv2d(8, 3, 1)
        )
        self.post_ln = nn.LayerNorm(8)
        self.query_embed = nn.Embedding(4, 8)


def groups_by_name(model: nn.Module, paramwise_cfg: dict | None) -> dict[str, dict]:
    """Builds the optimizer through the registry and maps parameter name -> its group."""
    cfg = dict(
        constructor='NATOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD),
    )
    if paramwise_cfg is not None:
        cfg['paramwise_cfg'] = paramwise_cfg
    optimizer = build_optim_wrapper(model, cfg).optimizer
    group_of = {id(p): group for group in optimizer.param_groups for p in group['params']}
    return {name: group_of[id(param)] for name, param in model.named_parameters()}


def is_norm_or_rpb(name: str) -> bool:
    """Names of the parameters expected without decay, written from the module layout."""
    owner = name.split('.')[-2] if '.' in name else ''
    return (
        name.endswith('.rpb')
        or owner.startswith('norm')  # norm, norm0..3, norm1, norm2 of NAT
        or owner == 'post_ln'
        or name.startswith(('head.1.', 'head.2.'))  # BatchNorm2d, GroupNorm
    )


def test_norms_and_rpb_lose_decay_even_under_a_backbone_key():
    torch.manual_seed(0)
    model = TinySegmentor()
    groups = groups_by_name(
        model,
        dict(
            custom_keys={
                'backbone': dict(lr_mult=0.1, decay_mult=1.0),
                'query_embed': dict(lr_mult=1.0, decay_mult=0.0),
            },
            norm_decay_mult=0.0,
        ),
    )
    assert any(name.endswith('.rpb') for name in groups)
    for name, group in groups.items():
        expected_lr = BASE_LR * (0.1 if name.startswith('backbone.') else 1.0)
        assert group['lr'] == pytest.approx(expected_lr), name
        if is_norm_or_rpb(name) or name.startswith('query_embed'):
            assert group['weight_decay'] == 0.0, name
        else:
            assert group['weight_decay'] == pytest.approx(BASE_WD), name


def test_default_constructor_would_decay_backbone_norms():
    # The reason the constructor exists: mmengine's longest-key match lets `backbone` win.
    model = TinySegmentor()
    cfg = dict(
        optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD),
        paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}, norm_decay_mult=0.0),
    )
    optimizer = build_optim_wrapper(model, cfg).optimizer
    decay = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    assert decay[id(model.backbone.patch_embed.norm.weight)] == pytest.approx(BASE_WD)


def test_empty_paramwise_cfg_still_applies_the_rule():
    model = TinySegmentor()
    groups = groups_by_name(model, None)
    assert groups['backbone.levels.0.blocks.0.attn.rpb']['weight_decay'] == 0.0
    assert groups['backbone.levels.0.blocks.0.norm1.weight']['weight_decay'] == 0.0
    assert groups['head.1.weight']['weight_decay'] == 0.0
    assert groups['backbone.levels.0.blocks.0.attn.qkv.weight']['weight_decay'] == BASE_WD
    assert groups['head.0.weight']['weight_decay'] == BASE_WD


def test_no_decay_ids_cover_exactly_norms_and_rpb():
    model = TinySegmentor()
    ids = no_decay_parameter_ids(model)
    names = {name for name, p in model.named_parameters() if id(p) in ids}
    expected = {name for name, _ in model.named_parameters() if is_norm_or_rpb(name)}
    assert names == expected
    assert len(names) > 20


def test_rpb_decay_mult_keeps_rpb_decay_and_still_zeroes_norms():
    # Mask2Former's recipe: detectron2's optimizer decays `rpb` (it exempts only norms, embeddings
    # and Swin's bias tables); NAT's own recipes do not.
    model = TinySegmentor()
    groups = groups_by_name(
        model,
        dict(
            custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=1.0)},
            norm_decay_mult=0.0,
            rpb_decay_mult=1.0,
        ),
    )
    rpb = [name for name in groups if name.endswith('.rpb')]
    assert rpb
    for name in rpb:
        assert groups[name]['weight_decay'] == pytest.approx(BASE_WD), name
        assert groups[name]['lr'] == pytest.approx(BASE_LR * 0.1), name
    for name, group in groups.items():
        if is_norm_or_rpb(name) and name not in rpb:
            assert group['weight_decay'] == 0.0, name
