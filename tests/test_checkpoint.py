"""Checkpoint formats: the same weights through every format give the reference outputs;
strict loading reports every bad key; the conversion tool."""

import argparse
import functools

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import nat_mm.checkpoint.strict as strict_module
from nat_mm.checkpoint import from_natmm, to_natmm
from nat_mm.errors import NatMMError
from nat_mm.models import DiNAT
from nat_mm.testing import nat_reference as ref

CFG = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), mlp_ratio=2.0)
KERNEL = 5
DILATIONS = [[1, 4], [3, 1], [1, 2], [1, 1]]
OUT_INDICES = (0, 1, 2, 3)


def random_state_dict(classifier: bool) -> dict[str, torch.Tensor]:
    """fp32 weights, as in files: detection layout (norm0-3) or ImageNet layout (norm, head)."""
    return ref.random_original_state_dict(
        32, (2, 2, 2, 2), (1, 2, 4, 8), 2.0, KERNEL, True, OUT_INDICES, classifier, seed=3,
        dtype=torch.float32,
    )  # fmt: skip


IMAGE = torch.randn(1, 3, 22, 27, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@functools.cache
def reference_outputs(classifier: bool) -> list[torch.Tensor]:
    """Reference maps of IMAGE for random_state_dict(classifier), computed once per module."""
    sd = {k: v.double() for k, v in random_state_dict(classifier).items()}
    for i in OUT_INDICES:  # ImageNet files have no output norms: they keep their init (identity)
        sd.setdefault(f'norm{i}.weight', torch.ones(32 * 2**i, dtype=torch.float64))
        sd.setdefault(f'norm{i}.bias', torch.zeros(32 * 2**i, dtype=torch.float64))
    return ref.nat_forward(sd, IMAGE, CFG['num_heads'], KERNEL, DILATIONS, OUT_INDICES)


def max_error_to_reference(source: str, classifier: bool) -> float:
    model = build_model(source)
    model.init_weights()
    with torch.no_grad():
        outputs = model.double().eval()(IMAGE)
    expected = reference_outputs(classifier)
    return max((o - e).abs().max().item() for o, e in zip(outputs, expected, strict=True))


def build_model(source: str, kernel_size: int = KERNEL) -> DiNAT:
    return DiNAT(
        arch=None,
        **CFG,
        layer_scale=1e-5,
        kernel_size=kernel_size,
        dilations=DILATIONS,
        init_cfg=dict(type='Pretrained', checkpoint=source),
    )


# Each writer stores the given original-layout weights in one format and returns the source.
def write_flat(sd, tmp_path):
    torch.save(sd, tmp_path / 'flat.pth')
    return str(tmp_path / 'flat.pth')


def write_under_model(sd, tmp_path):
    torch.save({'model': sd, 'epoch': 300}, tmp_path / 'model.pth')
    return str(tmp_path / 'model.pth')


def write_mmdet(sd, tmp_path):
    state_dict = {f'backbone.{k}': v for k, v in sd.items()}
    state_dict['neck.lateral_convs.0.conv.weight'] = torch.zeros(4, 32, 1, 1)
    state_dict['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(81, 4)
    torch.save({'state_dict': state_dict, 'meta': {'epoch': 36}}, tmp_path / 'mmdet.pth')
    return str(tmp_path / 'mmdet.pth')


def write_ddp_mmseg(sd, tmp_path):
    state_dict = {f'module.backbone.{k}': v for k, v in sd.items()}
    state_dict['module.decode_head.conv_seg.weight'] = torch.zeros(150, 8, 1, 1)
    torch.save({'state_dict': state_dict}, tmp_path / 'mmseg.pth')
    return str(tmp_path / 'mmseg.pth')


def write_hf_bin(sd, tmp_path):
    folder = tmp_path / 'hf_bin'
    folder.mkdir()
    torch.save(ref.to_huggingface_layout(sd, 'dinat.'), folder / 'pytorch_model.bin')
    return str(folder / 'pytorch_model.bin')


def write_hf_safetensors_file(sd, tmp_path):
    safetensors.torch.save_file(ref.to_huggingface_layout(sd, ''), tmp_path / 'model.safetensors')
    return str(tmp_path / 'model.safetensors')


def write_hf_folder(sd, tmp_path):
    folder = tmp_path / 'hf_folder'
    folder.mkdir()
    safetensors.torch.save_file(ref.to_huggingface_layout(sd, 'nat.'), folder / 'model.safetensors')
    return str(folder)


WRITERS = {
    'original flat': write_flat,
    'original under model': write_under_model,
    'mmdet backbone.': write_mmdet,
    'mmseg module.backbone.': write_ddp_mmseg,
    'huggingface bin': write_hf_bin,
    'huggingface safetensors file': write_hf_safetensors_file,
    'huggingface folder': write_hf_folder,
}


# Every format with detection weights (norm0-3); ImageNet weights (norm, head, no norm0-3) in
# the formats ImageNet checkpoints come in.
FORMAT_CASES = [(writer, False) for writer in WRITERS] + [
    (writer, True) for writer in ('original flat', 'original under model', 'huggingface bin')
]


@pytest.mark.parametrize(('writer', 'classifier'), FORMAT_CASES)
def test_every_format_gives_the_reference_outputs(writer, classifier, tmp_path):
    error = max_error_to_reference(
        WRITERS[writer](random_state_dict(classifier), tmp_path), classifier
    )
    print(f'{writer} ({"imagenet" if classifier else "detection"}): max abs error {error:.1e}')
    assert error < 1e-10


@pytest.mark.parametrize('name', ['flat.pth', 'model.safetensors'])
def test_url_checkpoint(name, http_root, tmp_path):
    root, base_url = http_root
    sd = random_state_dict(classifier=False)
    if name.endswith('.safetensors'):
        safetensors.torch.save_file(ref.to_huggingface_layout(sd, 'dinat.'), root / name)
    else:
        torch.save(sd, root / name)
    error = max_error_to_reference(f'{base_url}/{name}', classifier=False)
    print(f'url {name}: max abs error {error:.1e}')
    assert error < 1e-10
    assert len(list((tmp_path / 'torch_home').rglob(f'*{name}'))) == 1  # cached once


def test_rpb_is_resized_bicubically_when_the_kernel_differs(tmp_path):
    sd = random_state_dict(classifier=True)
    model = build_model(write_flat(sd, tmp_path), kernel_size=7)
    model.init_weights()
    for key, table in sd.items():
        if key.endswith('attn.rpb'):
            # Swin's / upstream's call: bicubic, align_corners=False, on [1, heads, S, S].
            expected = F.interpolate(table.unsqueeze(0), size=(13, 13), mode='bicubic')[0]
            torch.testing.assert_close(model.state_dict()[key], expected, rtol=0, atol=0)


def test_strict_loading_reports_every_problem_at_once(tmp_path):
    sd = random_state_dict(classifier=False)
    del sd['levels.1.blocks.0.mlp.fc1.bias']
    sd['levels.0.blocks.0.attn.extra'] = torch.zeros(3)
    sd['levels.2.blocks.1.norm2.weight'] = torch.zeros(7)
    sd['levels.3.blocks.0.mlp.fc2.weight'][0, 0] = float('nan')
    sd['head.weight'] = torch.zeros(10, 256)  # legitimately ignored
    path = write_flat(sd, tmp_path)
    model = build_model(path)
    with pytest.raises(NatMMError) as info:
        model.init_weights()
    message = str(info.value)
    assert '(original layout) does not fit DiNAT' in message and message.endswith(f'({path})')
    assert '1 missing keys: levels.1.blocks.0.mlp.fc1.bias;' in message
    assert '1 unexpected keys: levels.0.blocks.0.attn.extra;' in message
    assert 'levels.2.blocks.1.norm2.weight (checkpoint [7], model [128])' in message
    assert '1 keys with NaN or inf values: levels.3.blocks.0.mlp.fc2.weight' in message
    assert 'head.weight' not in message


def test_every_missing_key_is_listed(tmp_path):
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, tmp_path / 'resnet.pth')
    model = build_model(str(tmp_path / 'resnet.pth'))
    with pytest.raises(NatMMError) as info:
        model.init_weights()
    # The file has no output norms, so those may keep their init (as ImageNet checkpoints).
    expected = sorted(k for k in model.state_dict() if not k.startswith('norm'))
    assert f'{len(expected)} missing keys: ' in str(info.value)
    assert all(key in str(info.value) for key in expected)
    assert '1 unexpected keys: conv1.weight' in str(info.value)


def test_ignored_keys_are_logged(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(strict_module, 'print_log', lambda msg, **options: logged.append(msg))
    model = build_model(write_mmdet(random_state_dict(classifier=False), tmp_path))
    model.init_weights()
    assert any(
        'Loaded mmdet checkpoint' in m and 'neck.lateral_convs.0.conv.weight' in m for m in logged
    )


def test_missing_output_norms_are_an_error_when_the_file_has_some(tmp_path):
    sd = random_state_dict(classifier=False)
    del sd['norm2.weight'], sd['norm2.bias']
    with pytest.raises(NatMMError, match=r'2 missing keys: norm2\.bias, norm2\.weight'):
        build_model(write_flat(sd, tmp_path)).init_weights()


@pytest.mark.parametrize('shape', [(1, 13, 12), (1, 1, 1), (1, 11, 11), (2, 13, 13)])
def test_an_rpb_table_of_no_odd_kernel_is_an_error(shape, tmp_path):
    sd = random_state_dict(classifier=True)
    key = 'levels.3.blocks.0.attn.rpb'  # 8 heads, kernel 5
    sd[key] = torch.zeros(shape)
    with pytest.raises(NatMMError, match=rf'{key} \(checkpoint \[{", ".join(map(str, shape))}\]'):
        build_model(write_flat(sd, tmp_path)).init_weights()


def test_timm_arguments_in_the_file_load_without_trust(tmp_path):
    sd = random_state_dict(classifier=False)
    torch.save({'state_dict': sd, 'args': argparse.Namespace(epoch=3)}, tmp_path / 'timm.pth')
    model = build_model(str(tmp_path / 'timm.pth'))
    model.init_weights()
    torch.testing.assert_close(model.norm1.weight, sd['norm1.weight'])


@pytest.mark.parametrize(
    ('content', 'message'),
    [
        (None, 'checkpoint file does not exist'),
        (b'', r'checkpoint file is empty \(0 bytes\)'),
        (b'not a checkpoint', 'cannot read the checkpoint'),
        ({'optimizer': 3}, 'checkpoint must be a state dict of tensors'),
    ],
)
def test_unreadable_checkpoints(content, message, tmp_path):
    path = tmp_path / 'bad.pth'
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(NatMMError, match=message):
        build_model(str(path)).init_weights()


def test_huggingface_folder_without_weights(tmp_path):
    with pytest.raises(NatMMError, match='holds none of'):
        build_model(str(tmp_path)).init_weights()


@pytest.mark.parametrize(
    ('init_cfg', 'message'),
    [
        (dict(type='Pretrained'), 'init_cfg.checkpoint must be a path or URL'),
        (dict(type='Pretrained', checkpoint='x.pth', prefix='backbone.'), r"got also \['prefix'\]"),
        (dict(type='Pretrained', checkpoint='x.pth', trust='yes'), 'init_cfg.trust must be True'),
    ],
)
def test_bad_pretrained_init_cfg_fails_at_construction(init_cfg, message):
    with pytest.raises(NatMMError, match=message):
        DiNAT(arch=None, **CFG, kernel_size=KERNEL, dilations=DILATIONS, init_cfg=init_cfg)


@pytest.mark.parametrize('prefix', ['nat', 'dinat', ''])
def test_huggingface_conversion_matches_the_reference_layout(prefix):
    sd = random_state_dict(classifier=True)
    dotted = f'{prefix}.' if prefix else ''
    hf = from_natmm(sd, 'huggingface', hf_prefix=prefix)
    expected = ref.to_huggingface_layout(sd, dotted)
    assert sorted(hf) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(hf[key], value), key
    back, source_format, dropped = to_natmm(hf)
    assert source_format == 'huggingface' and dropped == []
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_cli_round_trip_through_every_format(tmp_path, call_tool):
    sd = random_state_dict(classifier=False)
    source = write_mmdet(sd, tmp_path)
    hf_folder = tmp_path / 'hf_out'
    convert = functools.partial(call_tool, 'convert_checkpoint')
    assert convert([source, f'{hf_folder}/', '--to', 'huggingface', '--hf-prefix', 'dinat']) == 0
    assert (hf_folder / 'model.safetensors').is_file()
    assert convert([hf_folder, tmp_path / 'mm.pth', '--to', 'mmdet']) == 0
    assert convert([tmp_path / 'mm.pth', tmp_path / 'orig.pth', '--to', 'original']) == 0
    restored = torch.load(tmp_path / 'orig.pth', weights_only=True)
    assert sorted(restored) == sorted(sd) and all(torch.equal(restored[k], sd[k]) for k in sd)
    mmdet = torch.load(tmp_path / 'mm.pth', weights_only=True)['state_dict']
    assert all(key.startswith('backbone.') for key in mmdet)


def test_cli_errors(tmp_path, call_tool, capsys):
    def convert(*argv):
        status = call_tool('convert_checkpoint', list(argv))
        return status, capsys.readouterr().err

    status, err = convert(tmp_path / 'absent.pth', tmp_path / 'out.pth', '--to', 'original')
    assert status == 2 and err.startswith('error: checkpoint file does not exist (')
    (tmp_path / 'empty.pth').write_bytes(b'')
    status, err = convert(tmp_path / 'empty.pth', tmp_path / 'out.pth', '--to', 'original')
    assert status == 2 and 'checkpoint file is empty' in err
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'resnet.pth')
    status, err = convert(tmp_path / 'resnet.pth', tmp_path / 'o.pth', '--to', 'original')
    assert status == 2 and 'not a NAT / DiNAT checkpoint' in err
    source = write_flat(random_state_dict(classifier=False), tmp_path)
    status, err = convert(source, source, '--to', 'original')
    assert status == 2 and 'pass --force' in err
    status, err = convert(source, tmp_path / 'x.safetensors', '--to', 'mmdet')
    assert status == 2 and 'safetensors holds a flat state dict only' in err
    assert not (tmp_path / 'x.safetensors').exists()


def test_cli_does_not_overwrite_the_file_inside_a_folder(tmp_path, call_tool, capsys):
    source = write_flat(random_state_dict(classifier=False), tmp_path)
    folder = tmp_path / 'hf'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes(b'precious')
    assert call_tool('convert_checkpoint', [source, folder, '--to', 'huggingface']) == 2
    assert 'pass --force' in capsys.readouterr().err
    assert (folder / 'model.safetensors').read_bytes() == b'precious'
    assert call_tool('convert_checkpoint', [source, folder, '--to', 'huggingface', '--force']) == 0
    assert (folder / 'model.safetensors').read_bytes() != b'precious'


def test_cli_rejects_unknown_formats(call_tool):
    with pytest.raises(SystemExit) as info:
        call_tool('convert_checkpoint', ['in.pth', 'out.pth', '--to', 'hf'])
    assert info.value.code == 2
