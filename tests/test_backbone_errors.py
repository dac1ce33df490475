"""Bad backbone configurations and inputs raise errors that name the argument and the fix."""

import pytest
import torch

from nat_mm.models import NAT, DiNAT, resolve_dilations

EXPLICIT = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4), mlp_ratio=1.0)


def build(cls=NAT, **overrides):
    cfg = dict(arch=None, **EXPLICIT, kernel_size=3)
    cfg.update(overrides)
    with torch.device('meta'):
        return cls(**cfg)


@pytest.mark.parametrize(
    ('overrides', 'message'),
    [
        (dict(arch='huge'), r"arch='huge' is not a known preset; expected one of \['base'"),
        (dict(embed_dim=None), r"arch=None needs explicit \['embed_dim'\]"),
        (dict(arch='tiny'), r"arch='tiny' conflicts with explicit \{'embed_dim': 16"),
        (dict(num_heads=(1, 1, 2)), r'depths=\(1, 1, 2, 1\) and num_heads=\(1, 1, 2\)'),
        (dict(num_heads=(1, 3, 2, 4)), r'stage 1 has 32 channels .* num_heads\[1\]=3'),
        (dict(kernel_size=4), r'kernel_size must be an odd int >= 3, got kernel_size=4'),
        (dict(kernel_size=1), r'kernel_size must be an odd int >= 3, got kernel_size=1'),
        (dict(out_indices=(0, 4)), r'out_indices=\(0, 4\) must be strictly increasing .* 0\.\.3'),
        (dict(out_indices=(2, 1)), r'out_indices=\(2, 1\) must be strictly increasing'),
        (dict(out_indices=()), r'out_indices=\(\) must be'),
        (dict(frozen_stages=5), r'frozen_stages=5 must be in -1\.\.4'),
        (dict(attn_drop_rate=0.1), r'attn_drop_rate=0.1 is not supported'),
        (dict(drop_path_rate=1.0), r'drop_path_rate must be in \[0, 1\), got 1.0'),
        (
            dict(dilations=[[1], [1], [1], [1]]),
            r'dilations\[2\]=\[1\] has 1 entries, expected .* 2',
        ),
        (dict(dilations=[[1], [1], [1, 1]]), r'dilations has 3 stages, expected 4'),
        (dict(dilations=[[1], [0], [1, 1], [1]]), r'dilations\[1\]=\[0\] must contain ints >= 1'),
        (dict(dilations='cityscapes'), r"dilations='cityscapes' is not a known schedule"),
        (dict(dilations='coco'), r"dilations='coco': stage 0 is defined for depth 3 only"),
        (dict(dilations=7), r'dilations must be a schedule name'),
    ],
)
def test_bad_configuration(overrides, message):
    error = TypeError if overrides.get('dilations') == 7 else ValueError
    with pytest.raises(error, match=message):
        build(**overrides)


def test_explicit_values_equal_to_the_preset_are_accepted():
    with torch.device('meta'):
        model = NAT(arch='small', embed_dim=96, depths=[3, 4, 18, 5], layer_scale=1e-5)
    assert model.out_channels == (96, 192, 384, 768)


def test_large_exists_for_dinat_only():
    with pytest.raises(ValueError, match="arch='large' is not a known preset"):
        build(arch='large', embed_dim=None, depths=None, num_heads=None, mlp_ratio=None)
    assert build(DiNAT, arch='large', **dict.fromkeys(EXPLICIT)).out_channels[0] == 192


def test_repeating_schedule_must_tile_the_depth():
    with pytest.raises(ValueError, match=r"'imagenet-224': stage 2 repeats \(1, 2\)"):
        resolve_dilations('imagenet-224', (3, 4, 5, 5))


def test_wrong_input_channels_at_forward():
    model = NAT(arch=None, **EXPLICIT, kernel_size=3)
    with pytest.raises(
        ValueError, match=r'expected input of shape \[B, 3, H, W\], got \(1, 4, 8, 8\)'
    ):
        model(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r'got \(3, 8, 8\)'):
        model(torch.zeros(3, 8, 8))
