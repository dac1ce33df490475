"""Command-line tools: every bad input ends with ``error: <what> (<where>)`` and exit status 2,
before any work is lost, and nothing existing is overwritten without ``--force``.

Most checks call a tool's ``main`` in this process (``call_tool``, fast); a few run
``python -m nat_mm.tools.<name>`` (``run_cli``) to check what a user sees: the status, the one-line
message on stderr, no traceback.
"""

import json
import os

import pytest
import torch

from nat_mm.apis import build_model, load_config
from nat_mm.apis.inference import picture_names
from nat_mm.apis.main_job import det_overrides, seg_overrides


def status_and_error(call_tool, capsys, name, argv):
    status = call_tool(name, argv)
    return status, capsys.readouterr().err


@pytest.fixture
def pretrain_config(tmp_path):
    path = tmp_path / 'cls.py'
    path.write_text("default_scope = 'mmpretrain'\nmodel = dict(type='ImageClassifier')\n")
    return str(path)


@pytest.fixture(scope='module')
def detector_weights(det_demo_config) -> dict:
    return build_model(load_config(det_demo_config)).state_dict()


@pytest.fixture
def evaluate_detector(call_tool, capsys, demo_data, det_demo_config, tmp_path):
    """``evaluate_detector(checkpoint, *options, cfg_options=())``: the test tool on the demo
    detector and demo data, work dir in tmp_path; returns (exit status, stderr)."""

    def run(checkpoint, *options, cfg_options=()):
        argv = [det_demo_config, checkpoint, '--work-dir', tmp_path / 'test', *options,
                '--cfg-options', *det_overrides(demo_data, None), *cfg_options]  # fmt: skip
        return status_and_error(call_tool, capsys, 'test', argv)

    return run


@pytest.fixture
def det_checkpoint(detector_weights, tmp_path) -> str:
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': detector_weights, 'meta': {}}, path)
    return str(path)


# ----------------------------------------------------------------------------- as a user sees it


def test_missing_config_exits_2_with_one_line(run_cli, tmp_path):
    result = run_cli('train', tmp_path / 'nope.py')
    assert result.returncode == 2
    assert result.stderr == f'error: config file does not exist ({tmp_path / "nope.py"})\n'


def test_config_of_another_library(run_cli, pretrain_config, tmp_path):
    result = run_cli('test', pretrain_config, tmp_path / 'x.pth')
    assert result.returncode == 2
    assert "default_scope='mmpretrain'" in result.stderr and 'Traceback' not in result.stderr


def test_make_data_refuses_a_foreign_folder(run_cli, tmp_path):
    (tmp_path / 'coco').mkdir()
    result = run_cli('make_data', '--out', tmp_path, '--num-train', 2, '--num-val', 1)
    assert result.returncode == 2 and 'refusing to overwrite' in result.stderr


def test_the_shims_in_tools_run_the_package_tools(repo_root, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(repo_root / 'tools' / 'get_flops.py'), '--backbone', 'nat-huge'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "unknown backbone 'nat-huge'" in result.stderr


# ----------------------------------------------------------------------------- configs


def test_config_without_library(call_tool, capsys, tmp_path):
    path = tmp_path / 'plain.py'
    path.write_text('model = dict()\n')
    assert status_and_error(call_tool, capsys, 'train', [path])[1].startswith(
        'error: the config has default_scope=None; nat_mm runs mmdet or mmseg configs'
    )


def test_broken_config(call_tool, capsys, tmp_path):
    path = tmp_path / 'broken.py'
    path.write_text('model = dict(\n')
    status, err = status_and_error(call_tool, capsys, 'train', [path])
    assert status == 2 and 'cannot read the config: ' in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp is allowed with a GPU')
def test_amp_needs_a_gpu(call_tool, capsys, det_demo_config):
    status, err = status_and_error(call_tool, capsys, 'train', [det_demo_config, '--amp'])
    assert status == 2 and 'mixed precision needs a CUDA GPU' in err and '(--amp)' in err


def test_a_model_that_cannot_be_built_names_the_argument(
    call_tool, capsys, demo_data, det_demo_config, tmp_path
):
    argv = [
        det_demo_config,
        '--work-dir',
        tmp_path / 'w',
        '--cfg-options',
        *det_overrides(demo_data, 2),
        'model.backbone.embed_dim=0',
    ]
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and 'embed_dim must be an even int >= 2, got embed_dim=0' in err


# ----------------------------------------------------------------------------- paths


def test_a_work_dir_that_is_a_file(call_tool, capsys, demo_data, det_demo_config, tmp_path):
    (tmp_path / 'work').write_text('')
    argv = [
        det_demo_config,
        '--work-dir',
        tmp_path / 'work',
        '--cfg-options',
        *det_overrides(demo_data, 2),
    ]
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and f'the work dir is a file, expected a folder ({tmp_path / "work"})' in err


def test_an_earlier_run_is_not_overwritten_without_resume_or_force(
    call_tool, capsys, demo_data, det_demo_config, tmp_path
):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    (work_dir / 'iter_2.pth').write_bytes(b'earlier')
    (work_dir / 'pretrained.pth').write_bytes(b'not a run')  # only a run's own files count
    argv = [det_demo_config, '--work-dir', work_dir, '--cfg-options', *det_overrides(demo_data, 2)]
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and 'the work dir holds an earlier run (iter_2.pth)' in err
    assert '--resume' in err and '--force' in err
    assert (work_dir / 'iter_2.pth').read_bytes() == b'earlier'


def test_metrics_json_that_is_a_folder_fails_before_the_evaluation(
    evaluate_detector, det_checkpoint, tmp_path
):
    (tmp_path / 'metrics').mkdir()
    status, err = evaluate_detector(det_checkpoint, '--metrics-json', tmp_path / 'metrics')
    assert status == 2 and '--metrics-json is a folder, expected a file path' in err
    assert not (tmp_path / 'test').exists()  # nothing ran


def test_existing_metrics_json_needs_force(evaluate_detector, det_checkpoint, tmp_path):
    (tmp_path / 'metrics.json').write_text('{}')
    status, err = evaluate_detector(det_checkpoint, '--metrics-json', tmp_path / 'metrics.json')
    assert status == 2 and '--metrics-json exists; pass --force to overwrite it' in err


def test_demo_out_dir_that_is_a_file(
    call_tool, capsys, demo_data, det_demo_config, det_checkpoint, tmp_path
):
    (tmp_path / 'pictures').write_text('')
    argv = [
        det_demo_config,
        det_checkpoint,
        f'{demo_data}/coco/val2017',
        '--out-dir',
        tmp_path / 'pictures',
    ]
    status, err = status_and_error(call_tool, capsys, 'demo', argv)
    assert status == 2 and 'is a file, expected a folder (--out-dir' in err


# ----------------------------------------------------------------------------- datasets


def test_missing_dataset_folder(call_tool, capsys, det_demo_config, tmp_path):
    missing = tmp_path / 'no_data'
    argv = [det_demo_config, '--cfg-options', f'train_dataloader.dataset.data_root={missing}']
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and 'the dataset folder data_root does not exist' in err
    assert err.rstrip().endswith(f'({missing})')


def _copy_coco(demo_data, tmp_path, edit):
    """The demo COCO data with its val annotation file edited."""
    import shutil

    root = tmp_path / 'data'
    shutil.copytree(demo_data, root)
    path = root / 'coco' / 'annotations' / 'instances_val2017.json'
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return str(root)


@pytest.mark.parametrize(
    ('edit', 'message'),
    [
        (lambda c: c.update(images=[]), 'the annotation file lists no images'),
        (lambda c: c['images'][0].update(width=100), 'but '),
        (lambda c: c['images'][0].update(file_name='gone.jpg'), "image 'gone.jpg' listed in"),
    ],
)
def test_broken_annotations_fail_before_the_evaluation(
    edit, message, call_tool, capsys, demo_data, det_demo_config, det_checkpoint, tmp_path
):
    root = _copy_coco(demo_data, tmp_path, edit)
    argv = [
        det_demo_config,
        det_checkpoint,
        '--work-dir',
        tmp_path / 'test',
        '--cfg-options',
        *det_overrides(root, None),
    ]
    status, err = status_and_error(call_tool, capsys, 'test', argv)
    assert status == 2 and message in err and 'instances_val2017.json' in err
    assert not (tmp_path / 'test').exists()


def test_a_training_set_without_annotations(
    call_tool, capsys, demo_data, det_demo_config, tmp_path
):
    import shutil

    root = tmp_path / 'data'
    shutil.copytree(demo_data, root)
    path = root / 'coco' / 'annotations' / 'instances_train2017.json'
    content = json.loads(path.read_text())
    content['annotations'] = []
    path.write_text(json.dumps(content))
    argv = [
        det_demo_config,
        '--work-dir',
        tmp_path / 'w',
        '--cfg-options',
        *det_overrides(str(root), 2),
    ]
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and 'the annotation file has no annotations to train on' in err


def test_an_empty_segmentation_folder(call_tool, capsys, demo_data, seg_demo_config, tmp_path):
    import shutil

    root = tmp_path / 'data'
    shutil.copytree(demo_data, root)
    images = root / 'ade' / 'ADEChallengeData2016' / 'images' / 'training'
    for name in os.listdir(images):
        os.remove(images / name)
    argv = [
        seg_demo_config,
        '--work-dir',
        tmp_path / 'w',
        '--cfg-options',
        *seg_overrides(str(root), 2),
    ]
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and 'image folder holds no image' in err


# ----------------------------------------------------------------------------- checkpoints


def test_missing_checkpoint(call_tool, capsys, det_demo_config, tmp_path):
    status, err = status_and_error(
        call_tool, capsys, 'test', [det_demo_config, tmp_path / 'missing.pth']
    )
    assert status == 2 and f'checkpoint file does not exist ({tmp_path / "missing.pth"})' in err


def test_unreadable_checkpoint(evaluate_detector, tmp_path):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(b'not a checkpoint')
    status, err = evaluate_detector(path)
    assert status == 2 and 'cannot read the checkpoint' in err


def test_checkpoint_of_another_model_is_named_key_by_key(
    evaluate_detector, seg_demo_config, tmp_path
):
    segmentor = build_model(load_config(seg_demo_config))
    path = tmp_path / 'seg.pth'
    torch.save({'state_dict': segmentor.state_dict()}, path)
    status, err = evaluate_detector(path)
    assert status == 2 and 'checkpoint does not fit the MaskRCNN model' in err
    assert 'missing keys: ' in err and 'roi_head.' in err
    assert 'unexpected keys: ' in err and 'decode_head.' in err


def test_non_finite_weights_are_an_error(evaluate_detector, detector_weights, tmp_path):
    weights = {key: value.clone() for key, value in detector_weights.items()}
    weights['rpn_head.rpn_cls.weight'][0] = float('nan')
    torch.save({'state_dict': weights, 'meta': {}}, tmp_path / 'nan.pth')
    status, err = evaluate_detector(tmp_path / 'nan.pth')
    assert status == 2 and '1 keys with NaN or inf values: rpn_head.rpn_cls.weight' in err


def test_an_evaluation_without_results_exits_2(evaluate_detector, det_checkpoint):
    status, err = evaluate_detector(det_checkpoint, cfg_options=['test_evaluator=[]'])
    assert status == 2 and 'the evaluation produced no metrics' in err


# ----------------------------------------------------------------------------- demo pictures


def test_picture_names_are_distinct():
    assert picture_names(['d/b.png', 'd/a.jpg']) == ['b.png', 'a.png']
    assert picture_names(['d/a.jpg', 'd/a.png', 'd/c.jpeg']) == ['a_jpg.png', 'a_png.png', 'c.png']


def test_demo_lists_images(tmp_path):
    from nat_mm.apis import list_images
    from nat_mm.errors import NatMMError

    with pytest.raises(NatMMError, match='neither an image file nor a folder'):
        list_images(str(tmp_path / 'missing'))
    with pytest.raises(NatMMError, match='holds no image'):
        list_images(str(tmp_path))
    for name in ('b.png', 'a.jpg', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert list_images(str(tmp_path)) == [str(tmp_path / 'a.jpg'), str(tmp_path / 'b.png')]
    assert list_images(str(tmp_path), 1) == [str(tmp_path / 'a.jpg')]


def test_demo_reports_an_unreadable_image_before_painting(
    call_tool, capsys, det_demo_config, det_checkpoint, tmp_path
):
    folder = tmp_path / 'images'
    folder.mkdir()
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8 definitely not a jpeg')
    argv = [det_demo_config, det_checkpoint, folder, '--out-dir', tmp_path / 'out']
    status, err = status_and_error(call_tool, capsys, 'demo', argv)
    assert status == 2 and 'cannot read the image' in err and 'broken.jpg' in err
    assert not (tmp_path / 'out').exists()


def test_demo_paints_same_named_images_apart_and_keeps_existing_pictures(
    call_tool, capsys, demo_data, det_demo_config, det_checkpoint, tmp_path
):
    from PIL import Image

    folder = tmp_path / 'images'
    folder.mkdir()
    source = sorted(os.listdir(f'{demo_data}/coco/val2017'))[0]
    image = Image.open(f'{demo_data}/coco/val2017/{source}')
    image.save(folder / 'a.jpg')
    image.save(folder / 'a.png')
    out = tmp_path / 'out'
    argv = [
        det_demo_config,
        det_checkpoint,
        folder,
        '--out-dir',
        out,
        '--cfg-options',
        *det_overrides(demo_data, None),
    ]
    assert call_tool('demo', argv) == 0
    assert sorted(os.listdir(out)) == ['a_jpg.png', 'a_png.png']
    assert Image.open(out / 'a_jpg.png').size == image.size
    assert 'wrote 2 pictures' in capsys.readouterr().out
    before = (out / 'a_jpg.png').read_bytes()
    status, err = status_and_error(call_tool, capsys, 'demo', argv)
    assert status == 2 and 'pictures exist already' in err and '--force' in err
    assert (out / 'a_jpg.png').read_bytes() == before
    assert call_tool('demo', [*argv, '--force']) == 0


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_rejects_unknown_backbone(call_tool, capsys):
    argv = ['--backbone', 'resnet50', '--no-peer', '--iters', '1']
    status, err = status_and_error(call_tool, capsys, 'benchmark', argv)
    assert status == 2 and "unknown backbone; expected one of ['nat-mini'" in err


def test_benchmark_rejects_missing_config(call_tool, capsys, tmp_path):
    status, err = status_and_error(call_tool, capsys, 'benchmark', [tmp_path / 'none.py'])
    assert status == 2 and 'config file does not exist' in err


def test_benchmark_measures_a_small_backbone():
    from nat_mm.analysis.benchmark import benchmark

    rows = benchmark(
        backbone='nat-mini',
        shape=(64, 64),
        warmup=0,
        iters=1,
        modes=('infer',),
        threads=1,
        peer=False,
    )
    assert len(rows) == 1
    assert rows[0]['seconds'] > 0 and rows[0]['peak_memory_mib'] > 0
    assert rows[0]['params_m'] == pytest.approx(19.47, abs=0.05)
    assert 0 < rows[0]['of_gemm_rate'] < 2


def test_make_data_rejects_bad_settings(call_tool, capsys, tmp_path):
    status, err = status_and_error(
        call_tool, capsys, 'make_data', ['--out', tmp_path, '--num-train', '0']
    )
    assert status == 2 and 'num_train' in err


def test_demo_paints_segmentation_maps_over_whole_images(
    call_tool, demo_data, seg_demo_config, tmp_path
):
    from PIL import Image

    segmentor = build_model(load_config(seg_demo_config))
    torch.save({'state_dict': segmentor.state_dict(), 'meta': {}}, tmp_path / 'seg.pth')
    images = f'{demo_data}/ade/ADEChallengeData2016/images/validation'
    out = tmp_path / 'out'
    argv = [
        seg_demo_config,
        tmp_path / 'seg.pth',
        images,
        '--out-dir',
        out,
        '--limit',
        1,
        '--cfg-options',
        *seg_overrides(demo_data, None),
    ]
    assert call_tool('demo', argv) == 0
    (picture,) = os.listdir(out)
    source = sorted(os.listdir(images))[0]
    assert picture == source.replace('.jpg', '.png')
    assert Image.open(out / picture).size == Image.open(f'{images}/{source}').size


def test_a_missing_pretrained_backbone_checkpoint_fails_before_training(
    call_tool, capsys, tmp_path
):
    config = 'configs/mmseg/nat/nat-mini-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py'
    argv = [
        config,
        '--work-dir',
        tmp_path / 'w',
        '--cfg-options',
        f'model.backbone.init_cfg.checkpoint={tmp_path / "nat_mini.pth"}',
    ]
    status, err = status_and_error(call_tool, capsys, 'train', argv)
    assert status == 2 and 'model.backbone.init_cfg: checkpoint file does not exist' in err
    assert not (tmp_path / 'w').exists()
