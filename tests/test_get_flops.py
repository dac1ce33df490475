"""FLOP counting (nat_mm.analysis.flops, tools/get_flops.py): published parameter / MAC counts,
config mode, and its error handling."""

from pathlib import Path

import pytest
import torch

import nat_mm.analysis.flops as flops_api
from nat_mm.apis import build_model, load_config
from nat_mm.errors import NatMMError
from nat_mm.ops.flops import OP_NAME

ROOT = Path(__file__).resolve().parents[1]
UPERNET_MINI = ROOT / 'configs/mmseg/nat/nat-mini-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py'
MASK_RCNN_MINI = ROOT / 'configs/mmdet/nat/mask-rcnn_nat-mini_fpn_amp-ms-crop-3x_coco.py'


def run(config=None, backbone=None, shape=None, options=None, all_mask_rois=False) -> dict:
    return flops_api.measure_flops(
        str(config) if config else None, backbone, shape, options, all_mask_rois=all_mask_rois
    )


def build_config_model(config: Path, options: dict):
    return build_model(load_config(str(config), options))


@pytest.mark.slow
def test_nat_mini_matches_published_params_and_gmacs(call_tool, capsys):
    # Published (original-models.md): NAT-Mini 2.7 GMACs at 224 (fvcore, with the 1k-class head,
    # whose 0.5 M MACs do not show at this precision); 19.47 M backbone params with norm0-3.
    assert call_tool('get_flops', ['--backbone', 'nat-mini', '--shape', '224']) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(':', 1) for line in out.splitlines())
    assert float(lines['Params'].split()[0]) == pytest.approx(19.47, abs=0.01)
    assert float(lines['GFLOPs'].split()[0]) == pytest.approx(2.7, abs=0.05)
    assert OP_NAME not in out


def na_macs(side: int, depths: tuple[int, ...], channels: int, kernel: int = 7) -> int:
    """Neighborhood-attention MACs of a NAT backbone on a side x side image, by the formula of
    neighborhood-attention.md (q.k and attn.v: 2 * H * W * K^2 * C per layer, on the map padded
    up to K when smaller)."""
    total = 0
    for stage, depth in enumerate(depths):
        tokens = max(side // 4 // 2**stage, kernel) ** 2
        total += depth * 2 * tokens * kernel**2 * channels * 2**stage
    return total


def test_nat_mini_counts_neighborhood_attention_and_matches_published_params():
    result = run(backbone='nat-mini', shape=(64,))
    assert result['params'] == pytest.approx(19.47e6, abs=0.01e6)  # published, shape-free
    assert OP_NAME not in result['uncounted']


def test_neighborhood_attention_share_follows_the_formula(monkeypatch):
    from mmengine.analysis import complexity_analysis

    from nat_mm.models import NAT

    model = NAT(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0)
    image = torch.rand(1, 3, 64, 64)
    _, with_na, uncounted = flops_api.count(model, image)
    assert OP_NAME not in uncounted
    handles = {
        op: handle
        for op, handle in complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.items()
        if op != OP_NAME
    }
    monkeypatch.setattr(complexity_analysis, '_DEFAULT_SUPPORTED_FLOP_OPS', handles)
    _, without_na, uncounted = flops_api.count(model, image)
    assert OP_NAME in uncounted
    assert with_na - without_na == na_macs(64, depths=(1, 2, 1, 1), channels=16)


def test_refuses_a_count_that_leaves_neighborhood_attention_out(monkeypatch):
    uncounted = {OP_NAME: 18, 'aten::add': 36}
    monkeypatch.setattr(flops_api, 'count', lambda model, inputs: (1, 1, uncounted))
    with pytest.raises(NatMMError, match='neighborhood attention was not counted'):
        run(backbone='nat-mini', shape=(64,))


# A 32-channel, 4-layer backbone (as tests/test_configs.py shrinks configs) keeps these fast.
TINY_BACKBONE = {
    'model.backbone.arch': None,
    'model.backbone.embed_dim': 32,
    'model.backbone.depths': [1, 1, 1, 1],
    'model.backbone.num_heads': [1, 2, 4, 8],
    'model.backbone.mlp_ratio': 2.0,
}


def backbone_macs(config: Path, options: dict, side: int) -> int:
    model = build_config_model(config, options)
    return flops_api.count(model.backbone, torch.rand(1, 3, side, side))[1]


def test_segmentor_config_counts_backbone_and_decode_head_only():
    options = {
        **TINY_BACKBONE,
        'model.decode_head.in_channels': [32, 64, 128, 256],
        'model.auxiliary_head.in_channels': 128,
    }
    whole = run(UPERNET_MINI, shape=(64,), options=options)
    model = build_config_model(UPERNET_MINI, options)
    expected_params = sum(
        p.numel() for part in (model.backbone, model.decode_head) for p in part.parameters()
    )  # the auxiliary head is dropped, as mmseg's get_flops does
    assert whole['params'] == expected_params
    assert whole['macs'] > backbone_macs(UPERNET_MINI, options, 64) > 0


def test_detector_config_runs_rpn_and_roi_heads():
    options = {
        **TINY_BACKBONE,
        'model.neck.in_channels': [32, 64, 128, 256],
        'model.test_cfg.rpn.max_per_img': 20,
    }
    whole = run(MASK_RCNN_MINI, shape=(128,), options=options)
    # The whole two-stage detector is counted, not its backbone alone: the 256-channel FPN, RPN
    # and RoI heads (the box head's two 1024-wide FC layers are 13.9 M MACs per RoI) are many
    # times this 32-channel backbone.
    assert whole['macs'] > 5 * backbone_macs(MASK_RCNN_MINI, options, 128)
    assert whole['params'] > 10_000_000


CASCADE_MINI = (
    ROOT / 'configs/mmdet/nat/cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
)


def test_cascade_mask_heads_count_the_first_rois_unless_asked(monkeypatch):
    """Published cascade counts ran the three mask heads on the first 100 RoIs; mmdet 3.x's tensor
    mode runs them on every proposal (--all-mask-rois). Here: 3 of at most 12 proposals."""
    monkeypatch.setattr(flops_api, 'MASK_ROIS', 3)
    options = {
        **TINY_BACKBONE,
        'model.neck.in_channels': [32, 64, 128, 256],
        'model.test_cfg.rpn.max_per_img': 12,
    }
    first = run(CASCADE_MINI, shape=(128,), options=options)
    every = run(CASCADE_MINI, shape=(128,), options=options, all_mask_rois=True)
    # MACs of one mask head on one 14 x 14 RoI feature, counted by the same analyzer.
    from mmengine.analysis import FlopAnalyzer

    model = build_config_model(CASCADE_MINI, options)
    mask_head = model.roi_head.mask_head[0].eval()
    with torch.no_grad():
        per_roi = FlopAnalyzer(mask_head, (torch.rand(1, 256, 14, 14),)).total()
    extra_rois, remainder = divmod(every['macs'] - first['macs'], 3 * per_roi)
    assert remainder == 0
    assert 1 <= extra_rois <= 12 - 3
    assert first['params'] == every['params']


@pytest.mark.parametrize(
    ('argv', 'message'),
    [
        (
            ['configs/does-not-exist.py'],
            'error: config file does not exist (configs/does-not-exist.py)',
        ),
        (['--backbone', 'nat-huge'], "error: unknown backbone 'nat-huge'; expected one of ["),
        (['--backbone', 'nat-mini', '--shape', '1', '2', '3'], 'expected S or H W, each >= 32'),
        ([], 'give exactly one of a config or a backbone'),
        (
            [str(UPERNET_MINI), '--backbone', 'nat-mini'],
            'give exactly one of a config or a backbone',
        ),
        ([str(UPERNET_MINI), '--dilations', 'coco'], 'apply to a bare backbone'),
    ],
)
def test_bad_input_exits_with_status_2_and_a_message(argv, message, call_tool, capsys):
    assert call_tool('get_flops', argv) == 2
    assert message in capsys.readouterr().err
