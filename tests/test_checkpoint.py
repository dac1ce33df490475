"""Checkpoint formats: the same weights through every format give the reference outputs."""

import argparse
import functools
import http.server
import importlib.util
import pathlib
import threading

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import nat_mm.models.checkpoint as checkpoint_module
from nat_mm.models import DiNAT, from_natmm, to_natmm
from nat_mm.testing import nat_reference as ref

REPO = pathlib.Path(__file__).parent.parent


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


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serves tmp_path/'www' on 127.0.0.1; downloads are cached under tmp_path/'torch_home'."""
    root = tmp_path / 'www'
    root.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


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
    sd['head.weight'] = torch.zeros(10, 256)  # legitimately ignored
    model = build_model(write_flat(sd, tmp_path))
    with pytest.raises(ValueError) as info:
        model.init_weights()
    message = str(info.value)
    assert '(original format) does not fit DiNAT' in message
    assert 'missing in checkpoint (1):\n  levels.1.blocks.0.mlp.fc1.bias' in message
    assert 'unexpected in checkpoint (1):\n  levels.0.blocks.0.attn.extra' in message
    assert 'levels.2.blocks.1.norm2.weight: checkpoint (7,) vs model (128,)' in message
    assert 'head.weight' not in message


def test_ignored_keys_are_logged(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(checkpoint_module, 'print_log', lambda msg, logger=None: logged.append(msg))
    model = build_model(write_mmdet(random_state_dict(classifier=False), tmp_path))
    model.init_weights()
    assert any(
        'Loaded mmdet checkpoint' in m and 'neck.lateral_convs.0.conv.weight' in m for m in logged
    )


def test_missing_output_norms_are_an_error_when_the_file_has_some(tmp_path):
    sd = random_state_dict(classifier=False)
    del sd['norm2.weight'], sd['norm2.bias']
    with pytest.raises(ValueError, match=r'missing in checkpoint \(2\):\n  norm2.weight'):
        build_model(write_flat(sd, tmp_path)).init_weights()


def test_pickled_metadata_falls_back_with_a_warning(tmp_path):
    sd = random_state_dict(classifier=False)
    torch.save({'state_dict': sd, 'meta': argparse.Namespace(epoch=3)}, tmp_path / 'meta.pth')
    model = build_model(str(tmp_path / 'meta.pth'))
    with pytest.warns(UserWarning, match='weights_only=False'):
        model.init_weights()
    torch.testing.assert_close(model.norm1.weight, sd['norm1.weight'])


@pytest.mark.parametrize(
    ('content', 'error', 'message'),
    [
        (None, FileNotFoundError, 'does not exist'),
        (
            {'state_dict': {'conv1.weight': torch.zeros(1)}},
            ValueError,
            r'missing in checkpoint \(\d+\):[\s\S]*\.\.\. and \d+ more\nunexpected in checkpoint '
            r'\(1\):\n  conv1.weight',
        ),
        ({'optimizer': 3}, TypeError, 'checkpoint must be a state dict of tensors'),
    ],
)
def test_unreadable_checkpoints(content, error, message, tmp_path):
    path = tmp_path / 'bad.pth'
    if content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=message):
        build_model(str(path)).init_weights()


def test_huggingface_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match='holds none of'):
        build_model(str(tmp_path)).init_weights()


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


def load_cli():
    spec = importlib.util.spec_from_file_location(
        'convert_checkpoint', REPO / 'tools' / 'convert_checkpoint.py'
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_round_trip_through_every_format(tmp_path):
    cli = load_cli()
    sd = random_state_dict(classifier=False)
    source = write_mmdet(sd, tmp_path)
    hf_folder = tmp_path / 'hf_out'
    assert cli.main([source, f'{hf_folder}/', '--to', 'huggingface', '--hf-prefix', 'dinat']) == 0
    assert (hf_folder / 'model.safetensors').is_file()
    assert cli.main([str(hf_folder), str(tmp_path / 'mm.pth'), '--to', 'mmdet']) == 0
    assert cli.main([str(tmp_path / 'mm.pth'), str(tmp_path / 'orig.pth'), '--to', 'original']) == 0
    restored = torch.load(tmp_path / 'orig.pth', weights_only=True)
    assert sorted(restored) == sorted(sd) and all(torch.equal(restored[k], sd[k]) for k in sd)
    mmdet = torch.load(tmp_path / 'mm.pth', weights_only=True)['state_dict']
    assert all(key.startswith('backbone.') for key in mmdet)


def test_cli_errors(tmp_path, capsys):
    cli = load_cli()
    assert (
        cli.main([str(tmp_path / 'absent.pth'), str(tmp_path / 'out.pth'), '--to', 'original']) == 1
    )
    assert 'does not exist' in capsys.readouterr().err
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'resnet.pth')
    assert (
        cli.main([str(tmp_path / 'resnet.pth'), str(tmp_path / 'o.pth'), '--to', 'original']) == 1
    )
    assert 'is not a NAT/DiNAT checkpoint' in capsys.readouterr().err
    source = write_flat(random_state_dict(classifier=False), tmp_path)
    assert cli.main([source, source, '--to', 'original']) == 1
    assert 'pass --force' in capsys.readouterr().err
    assert cli.main([source, str(tmp_path / 'x.safetensors'), '--to', 'mmdet']) == 1
    assert 'safetensors holds a flat state dict only' in capsys.readouterr().err


def test_cli_rejects_unknown_formats():
    with pytest.raises(SystemExit) as info:
        load_cli().main(['in.pth', 'out.pth', '--to', 'hf'])
    assert info.value.code == 2
