"""Hand-crafted whole-model checkpoints against the claims of docs/checkpoints.md sections 2, 6
and 7: loading runs no code from the file, is strict (every bad key named, nothing dropped
silently), detects the layout right, refuses odd ``meta`` types with a NatMMError naming the
field; ``convert_checkpoint --to mmdet3 / mmseg1`` never overwrites without ``--force``; resume
refuses a file without usable training state before loading anything.

The files are built with the helpers of tests/test_upstream_checkpoints.py (mmcv 1.x files of
shrunk detectors / segmentors) and tests/test_detectron2_mask2former.py (d2 Mask2Former weights
of a shrunk model).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip('mmdet', reason='mmdet is not installed')
pytest.importorskip('mmseg', reason='mmsegmentation is not installed')

from nat_mm.apis import init_inferencer
from nat_mm.apis.config import build_model
from nat_mm.checkpoint import (
    UnsafeCheckpointError,
    compare_state_dicts,
    dataset_meta_from,
    load_checkpoint,
    load_model_checkpoint,
    load_model_state,
    load_state_dict_strictly,
    to_host_checkpoint,
    unwrap_state_dict,
)
from nat_mm.checkpoint.detectron2 import mask2former_to_openmmlab
from nat_mm.errors import NatMMError
from tests.test_detectron2_mask2former import d2_state_dict, shrunk_config, small
from tests.test_upstream_checkpoints import (
    COCO_CLASSES_HEAD,
    demo_upstream_file,
    mmcv1_checkpoint,
    small_model,
    small_upstream_weights,
    upstream_meta,
    write_upstream_file,
)

D2_NAME = 'ade20k-semantic'  # the shrunk d2 model under test (mmseg, decode_head.*)
PD = 'sem_seg_head.pixel_decoder'
PR = 'sem_seg_head.predictor'


@pytest.fixture(scope='module')
def d2_weights() -> dict[str, torch.Tensor]:
    return d2_state_dict(small(D2_NAME))


@pytest.fixture(scope='module')
def d2_model() -> nn.Module:
    """Our mmseg Mask2Former at the shrunk sizes (each test loads every weight, or none)."""
    return build_model(shrunk_config(D2_NAME, small(D2_NAME))).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


# ----------------------------------------------------------------------------- detectron2 keys


@pytest.mark.parametrize(
    ('alias', 'real'),
    [
        (f'{PD}.adapter_01.weight', f'{PD}.adapter_1.weight'),  # int('01') == 1
        (f'{PD}.layer_\u0661.norm.bias', f'{PD}.layer_1.norm.bias'),  # Arabic-Indic digit one
        (f'{PR}.mask_embed.layers.01.weight', f'{PR}.mask_embed.layers.1.weight'),
    ],
)
def test_a_d2_index_spelled_another_way_is_refused_not_merged_into_the_real_key(
    alias, real, d2_weights
):
    """Two d2 keys must never land on one model key (one would win silently), and a misspelt
    index is a misnamed key."""
    with pytest.raises(NatMMError) as error:
        mask2former_to_openmmlab({**d2_weights, alias: torch.zeros_like(d2_weights[real])}, 'mmseg')
    assert str(error.value).startswith('1 keys of the detectron2 Mask2Former checkpoint')
    assert alias in str(error.value)
    alone = {key: value for key, value in d2_weights.items() if key != real}
    with pytest.raises(NatMMError, match='1 keys of the detectron2'):  # not taken for the real one
        mask2former_to_openmmlab({**alone, alias: d2_weights[real]}, 'mmseg')


def test_a_d2_adapter_of_level_0_is_refused():
    """d2 numbers its FPN adapters from 1 (``adapter_{idx + 1}``); 0 has no mmdet counterpart."""
    with pytest.raises(NatMMError, match=r'adapter_0\.weight'):
        mask2former_to_openmmlab({f'{PD}.adapter_0.weight': torch.zeros(1)}, 'mmdet')


def test_a_d2_file_with_host_head_keys_too_is_refused_naming_each(d2_weights):
    mixed = {
        **d2_weights,
        'panoptic_head.cls_embed.weight': torch.zeros(1),
        'decode_head.cls_embed.bias': torch.zeros(1),
        'neck.lateral_convs.0.conv.weight': torch.zeros(1),
    }
    for host in ('mmdet', 'mmseg'):
        with pytest.raises(NatMMError) as error:
            mask2former_to_openmmlab(mixed, host)
        message = str(error.value)
        assert message.startswith('3 keys of the detectron2 Mask2Former checkpoint')
        for key in ('panoptic_head.cls_embed.weight', 'decode_head.cls_embed.bias', 'neck.'):
            assert key in message


def test_a_module_prefixed_d2_file_loads_and_a_prefix_collision_is_refused(
    d2_weights, d2_model, tmp_path
):
    prefixed = {f'module.{key}': value for key, value in d2_weights.items()}
    torch.save({'model': prefixed, 'iteration': 3}, tmp_path / 'ddp.pth')
    load_model_checkpoint(d2_model, tmp_path / 'ddp.pth')
    head = d2_model.decode_head
    assert torch.equal(head.cls_embed.bias, d2_weights[f'{PR}.class_embed.bias'])

    before = snapshot(d2_model)
    key = f'{PR}.class_embed.bias'
    clash = {**d2_weights, f'module.{key}': torch.zeros_like(d2_weights[key])}
    torch.save({'model': clash}, tmp_path / 'clash.pth')
    with pytest.raises(NatMMError, match=r'both with and without the "module\." prefix') as error:
        load_model_checkpoint(d2_model, tmp_path / 'clash.pth')
    assert key in str(error.value)
    assert_unchanged(d2_model, before)


def test_a_state_dict_and_a_model_entry_together_are_refused(d2_weights):
    """Which one is the model's weights would be a guess (the other would be dropped)."""
    host = small_upstream_weights('upernet', 'dinats')
    with pytest.raises(NatMMError, match=r'both a "state_dict" and a "model" entry'):
        to_host_checkpoint({'state_dict': host, 'model': d2_weights}, 'mmseg', 'both.pth')
    with pytest.raises(NatMMError, match=r'both a "state_dict" and a "model" entry'):
        unwrap_state_dict({'state_dict': {}, 'model': d2_weights}, 'both.pth')


def test_non_string_state_dict_keys_are_an_error_not_an_attribute_error():
    with pytest.raises(NatMMError, match=r'keys must be strings.*\b0\b'):
        unwrap_state_dict({'state_dict': {0: torch.zeros(1), 'a': torch.zeros(1)}}, 'x.pth')


# ----------------------------------------------------------------------------- values and dtypes


def test_a_non_finite_value_in_a_converted_key_is_reported_and_nothing_loads(d2_weights, d2_model):
    bad = dict(d2_weights)
    bad[f'{PR}.class_embed.bias'] = torch.full_like(bad[f'{PR}.class_embed.bias'], math.nan)
    bad[f'{PD}.adapter_1.weight'] = torch.full_like(bad[f'{PD}.adapter_1.weight'], math.inf)
    before = snapshot(d2_model)
    with pytest.raises(NatMMError) as error:
        load_model_state(d2_model, {'model': bad}, 'nan.pth')
    assert (
        '2 keys with NaN or inf values: decode_head.cls_embed.bias, '
        'decode_head.pixel_decoder.lateral_convs.0.conv.weight'
    ) in str(error.value)
    assert_unchanged(d2_model, before)


class Small(nn.Module):
    """A float parameter and an int buffer, as every detector has (conv weights, BN counters)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def small_weights(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    weights = {key: value.clone() for key, value in Small().state_dict().items()}
    weights.update({key.replace('__', '.'): value for key, value in changes.items()})
    return weights


def test_values_that_overflow_in_the_models_dtype_are_reported():
    """1e39 is finite in float64 and inf in the model's float32: loading would put inf there."""
    model = Small()
    huge = torch.full((2, 3), 1e39, dtype=torch.float64)
    with pytest.raises(NatMMError, match=r'1 keys with NaN or inf values: linear\.weight'):
        load_state_dict_strictly(model, small_weights(linear__weight=huge), 'f64.pth')
    assert bool(torch.isfinite(model.linear.weight).all())


@pytest.mark.parametrize(
    ('key', 'value', 'found'),
    [
        ('linear.weight', torch.full((2, 3), complex(math.nan, 1.0)), 'torch.complex64'),
        ('linear.weight', torch.ones(2, 3, dtype=torch.bool), 'torch.bool'),
        ('linear.weight', torch.ones(2, 3, dtype=torch.int32), 'torch.int32'),
        ('linear.bias', torch.full((2,), math.nan).to(torch.float8_e4m3fn), None),  # NaN
        ('bn.num_batches_tracked', torch.tensor(7.5), 'torch.float32'),
        ('linear.bias', torch.empty(2, device='meta'), 'a meta tensor'),
    ],
    ids=['complex-nan', 'bool', 'int32', 'float8-nan', 'float-counter', 'meta'],
)
def test_a_tensor_of_another_kind_of_dtype_is_reported_by_name(key, value, found):
    """load_state_dict would cast it silently (a complex NaN's real part, True as 1.0, 7.5 as 7)
    or fail with a bare error (a meta tensor)."""
    model = Small()
    before = snapshot(model)
    with pytest.raises(NatMMError) as error:
        load_state_dict_strictly(model, small_weights(**{key.replace('.', '__'): value}), 'x.pth')
    message = str(error.value)
    if found is None:
        assert f'1 keys with NaN or inf values: {key}' in message
    else:
        assert f'1 keys with another dtype: {key} (checkpoint {found}, model ' in message
    assert_unchanged(model, before)


def test_a_quantized_tensor_is_reported_by_name():
    quantized = torch.quantize_per_tensor(torch.zeros(2, 3), 0.1, 0, torch.qint8)
    report = compare_state_dicts(Small().state_dict(), small_weights(linear__weight=quantized))
    assert report.mis_typed == ['linear.weight (checkpoint torch.qint8, model torch.float32)']


def test_lower_precision_floats_and_other_int_widths_load_as_before():
    """The casts that lose nothing a model trained in fp16 / bf16 had (and int32 counters)."""
    model = Small()
    weights = small_weights(
        linear__weight=torch.randn(2, 3).half(),
        linear__bias=torch.randn(2).bfloat16(),
        bn__num_batches_tracked=torch.tensor(5, dtype=torch.int32),
    )
    load_state_dict_strictly(model, weights, 'half.pth')
    assert torch.equal(model.linear.weight, weights['linear.weight'].float())
    assert int(model.bn.num_batches_tracked) == 5


# ----------------------------------------------------------------------------- meta
HUGE_NAME = 'person' * 200_000


@pytest.mark.parametrize(
    'classes',
    [80, torch.tensor(3), HUGE_NAME, {'person', 'car'}, {'person': 0}, (), [torch.zeros(2)]],
    ids=['int', 'tensor-0d', 'huge-string', 'set', 'dict', 'empty', 'nested-tensor'],
)
def test_bad_mmcv1_class_names_are_refused_naming_the_field(classes):
    with pytest.raises(NatMMError, match=r'^meta\.CLASSES must be a list of class names') as error:
        dataset_meta_from({'CLASSES': classes})
    assert len(str(error.value)) < 300  # a short message, not the value


@pytest.mark.parametrize(
    'palette',
    [5, [5, 6], [[300, 0, 0], [0, 0, 0]], [[-1, 0, 0], [0, 0, 0]], [[True, 0, 0], [0, 0, 0]],
     [{0: 1, 1: 2, 2: 3}, [0, 0, 0]], [[1, 2, 3]], [[1.5, 2, 3], [0, 0, 0]],
     [torch.tensor([1, 2, 3]), [0, 0, 0]]],
    ids=['int', 'ints', '300', 'negative', 'bool', 'dict-color', 'too-short', 'float', 'tensor'],
)  # fmt: skip
def test_bad_mmcv1_palettes_are_refused_naming_the_field(palette):
    with pytest.raises(NatMMError, match=r'^meta\.PALETTE must hold one \[r, g, b\] of ints per'):
        dataset_meta_from({'CLASSES': ('wall', 'sky'), 'PALETTE': palette})


@pytest.mark.parametrize(
    ('dataset_meta', 'field'),
    [
        ({'classes': 5}, 'classes'),
        ({'classes': torch.zeros(3)}, 'classes'),
        ({'classes': 'person'}, 'classes'),
        ({'classes': ('a', 'b'), 'palette': [[1, 2, 3]]}, 'palette'),  # fewer colors than classes
        ({'classes': ('a',), 'palette': [[256, 0, 0]]}, 'palette'),
        ({'classes': ('a',), 'palette': 'coco'}, 'palette'),
        ({'classes': ('a',), 'CLASSES': ('b',)}, 'CLASSES'),  # one would win silently
        (['a', 'b'], 'dict'),  # the inferencers call .items() / .get() on it
    ],
    ids=[
        'int',
        'tensor',
        'string',
        'short-palette',
        '256',
        'palette-name',
        'two-spellings',
        'list',
    ],
)
def test_a_files_own_dataset_meta_is_checked_too(dataset_meta, field):
    with pytest.raises(NatMMError, match=r'^meta\.dataset_meta') as error:
        dataset_meta_from({'dataset_meta': dataset_meta})
    assert field in str(error.value)


def test_what_mmengine_writes_as_dataset_meta_is_kept_as_it_is():
    """mmdet's palettes are tuples and may be longer than a subset of classes; mmseg adds
    label_map / reduce_zero_label; a palette may be None."""
    mmdet = {'classes': ('a', 'b'), 'palette': [(220, 20, 60), (119, 11, 32), (0, 0, 142)]}
    assert dataset_meta_from({'dataset_meta': mmdet}) == mmdet
    mmseg = {'classes': ['a'], 'palette': None, 'label_map': {0: 1}, 'reduce_zero_label': False}
    assert dataset_meta_from({'dataset_meta': mmseg}) == mmseg


@pytest.mark.parametrize('meta', ['hello', ['CLASSES'], torch.zeros(1)], ids=['str', 'list', 't'])
def test_a_meta_that_is_not_a_dict_is_refused(meta):
    weights = small_upstream_weights('upernet', 'dinats')
    with pytest.raises(NatMMError, match=r'^meta must be a dict'):
        to_host_checkpoint({'state_dict': weights, 'meta': meta}, 'mmseg', 'x.pth')


@pytest.mark.parametrize(
    'version', [1.4, torch.tensor(1.4), ('1', '4')], ids=['float', 't', 'tuple']
)
def test_an_mmcv_version_that_is_not_a_string_is_refused(version):
    """A float 1.4 was taken for mmcv 1.x (str(1.4) starts with '1.')."""
    weights = small_upstream_weights('upernet', 'dinats')
    meta = {'mmcv_version': version, 'CLASSES': ('wall',)}
    with pytest.raises(NatMMError, match=r'^meta\.mmcv_version must be a version string'):
        to_host_checkpoint({'state_dict': weights, 'meta': meta}, 'mmseg', 'x.pth')


def test_the_inferencer_refuses_bad_class_names_before_any_prediction(det_demo_config, tmp_path):
    """Before: the inferencer kept classes=5 and its visualizer failed later, on the first
    picture."""
    path, weights = demo_upstream_file(tmp_path / 'upstream.pth', 'mmdet')
    torch.save({'state_dict': weights, 'meta': {'dataset_meta': {'classes': 5}}}, path)
    with pytest.raises(NatMMError, match=r'meta\.dataset_meta\.classes must be a list'):
        init_inferencer(det_demo_config, str(path))


# ----------------------------------------------------------------------------- library and layout


def test_a_detector_file_never_loads_into_a_segmentor_and_back(tmp_path):
    detector_file = write_upstream_file(
        tmp_path / 'det.pth',
        mmcv1_checkpoint(
            small_upstream_weights('mask-rcnn', 'nat'),
            upstream_meta('mmdet', COCO_CLASSES_HEAD, config=''),
        ),
    )
    segmentor, detector = small_model('upernet', 'dinats'), small_model('mask-rcnn', 'nat')
    for model, wrong in ((segmentor, detector_file), (detector, None)):
        if wrong is None:
            wrong = tmp_path / 'seg.pth'
            torch.save({'state_dict': small_upstream_weights('upernet', 'dinats')}, wrong)
        before = snapshot(model)
        with pytest.raises(NatMMError) as error:
            load_model_checkpoint(model, wrong)
        message = str(error.value)
        assert 'missing keys: ' in message and 'unexpected keys: ' in message
        head = 'roi_head.' if model is segmentor else 'decode_head.'
        assert head in message.split('unexpected keys: ')[1]
        assert_unchanged(model, before)


def test_convert_to_mmseg1_needs_a_decode_head(call_tool, capsys, tmp_path):
    """A detector without rpn / roi heads (SOLO-like: backbone, neck, mask_head) is no segmentor:
    every mmseg 1.x segmentor has a decode_head."""
    weights = {
        key: value
        for key, value in small_upstream_weights('mask-rcnn', 'nat').items()
        if key.startswith(('backbone.', 'neck.'))
    }
    weights['mask_head.conv_mask.weight'] = torch.zeros(4, 32, 1, 1)
    source, out = tmp_path / 'solo.pth', tmp_path / 'solo_mmseg1.pth'
    torch.save({'state_dict': weights, 'meta': {'CLASSES': ('a',)}}, source)
    assert call_tool('convert_checkpoint', [source, out, '--to', 'mmseg1']) == 2
    assert 'no decode_head.' in capsys.readouterr().err
    assert not out.exists()


def test_convert_never_overwrites_without_force_not_even_its_source(call_tool, capsys, tmp_path):
    source, _ = demo_upstream_file(tmp_path / 'mask_rcnn.pth', 'mmdet')
    original = source.read_bytes()
    assert call_tool('convert_checkpoint', [source, source, '--to', 'mmdet3']) == 2
    assert capsys.readouterr().err.startswith('error: destination exists; pass --force')
    assert source.read_bytes() == original
    target = tmp_path / 'taken.pth'
    target.write_bytes(b'keep me')
    assert call_tool('convert_checkpoint', [source, target, '--to', 'mmdet3']) == 2
    assert target.read_bytes() == b'keep me'
    assert call_tool('convert_checkpoint', [source, target, '--to', 'mmdet3', '--force']) == 0
    assert load_checkpoint(target)['meta']['converted_from']['layout'] == 'mmdet2'


def test_convert_with_non_string_top_level_keys_exits_cleanly(call_tool, capsys, tmp_path):
    _, weights = demo_upstream_file(tmp_path / 'mask_rcnn.pth', 'mmdet')
    source = tmp_path / 'odd.pth'
    torch.save({'state_dict': weights, 'meta': {}, 1: 'one', 'optimizer': {}}, source)
    assert call_tool('convert_checkpoint', [source, tmp_path / 'o.pth', '--to', 'mmdet3']) == 0
    assert "dropped the training state of the mmdet3 checkpoint: ['1', 'optimizer']" in (
        capsys.readouterr().out
    )


# ----------------------------------------------------------------------------- code and resume


def test_a_d2_file_with_a_payload_runs_nothing_on_the_whole_model_paths(
    write_payload, d2_weights, d2_model, call_tool, capsys, tmp_path
):
    path, marker = write_payload({'model': d2_weights, 'iteration': 1})
    with pytest.raises(UnsafeCheckpointError):
        load_model_checkpoint(d2_model, path)
    out = tmp_path / 'm2f_mmseg1.pth'
    assert call_tool('convert_checkpoint', [path, out, '--to', 'mmseg1']) == 2
    assert capsys.readouterr().err.startswith('error: ')
    assert not marker.exists() and not out.exists()


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.data_preprocessor = nn.Identity()

    def forward(self, inputs, labels, mode='tensor'):
        return self.linear(inputs)


class ToyData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {'inputs': torch.ones(2), 'labels': torch.ones(())}


HUB = {'log_scalars': {}, 'runtime_info': {}, 'resumed_keys': {}}


@pytest.mark.parametrize(
    ('training_state', 'named'),
    [
        ({'meta': {'dataset_meta': {'classes': ('a',)}}, 'message_hub': HUB}, 'meta.epoch'),
        ({'meta': {'epoch': 0, 'iter': '4'}, 'message_hub': HUB}, 'meta.iter'),
        ({'meta': 'epoch 0', 'message_hub': HUB}, 'meta'),
        ({'meta': {'epoch': 0, 'iter': 4}, 'message_hub': {}}, 'message_hub'),
        ({'meta': {'epoch': 0, 'iter': 4}, 'message_hub': [1]}, 'message_hub'),
    ],
    ids=['no-epoch', 'str-iter', 'str-meta', 'empty-hub', 'list-hub'],
)
def test_resume_refuses_unusable_training_state_before_loading(training_state, named, tmp_path):
    """Before: mmengine's resume loaded the weights, then failed with KeyError / AssertionError /
    TypeError on what it reads next."""
    from nat_mm.engine import SafeLoadRunner

    runner = SafeLoadRunner(
        model=Toy(),
        work_dir=str(tmp_path / 'work'),
        experiment_name=f'resume_{named}_{tmp_path.name}',
        train_dataloader=dict(
            dataset=ToyData(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=8),
        default_scope='mmengine',
    )
    before = snapshot(runner.model)
    path = tmp_path / 'iter_4.pth'
    weights = {'linear.weight': torch.full((1, 2), 3.0), 'linear.bias': torch.ones(1)}
    torch.save({'state_dict': weights, **training_state}, path)
    with pytest.raises(NatMMError, match=rf'cannot resume from this file: it has no .*{named}'):
        runner.resume(str(path), map_location='cpu')
    assert_unchanged(runner.model, before)
