"""The model zoo as OpenMMLab metafiles: ``configs/{mmdet,mmseg}/*/metafile.yml``, the root
``model-index.yml`` and their copy in the package (``nat_mm/.mim``, where mim looks).

The metafiles must parse (``modelindex``, yaml), hold exactly one entry per config, agree with the
configs they name (schedule, batch, precision, backbone, pre-trained file) and with the zoo tables
of configs/README.md cell by cell. The trained-weights URLs and upstream files are checked against
upstream's naming, transcribed here from SHI-Labs/Neighborhood-Attention-Transformer
``detection/NAT.md``, ``detection/DiNAT.md``, ``segmentation/NAT.md``, ``segmentation/DiNAT.md`` and
``mask2former/README.md`` (not read by the tests).
"""

import collections
import functools
import glob
import importlib.util
import json
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from modelindex import load as load_model_index

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
METAFILES = sorted(CONFIGS.glob('mm*/*/metafile.yml'))
UPSTREAM_COMMIT = 'd334f5bb0bd73cad05e5aeaf7c14cce3876a9650'
UPSTREAM_BLOB = (
    f'https://github.com/SHI-Labs/Neighborhood-Attention-Transformer/blob/{UPSTREAM_COMMIT}/'
)
NAT_PAPER = {
    'URL': 'https://arxiv.org/abs/2204.07143',
    'Title': 'Neighborhood Attention Transformer',
}
DINAT_PAPER = {
    'URL': 'https://arxiv.org/abs/2209.15001',
    'Title': 'Dilated Neighborhood Attention Transformer',
}
PUBLISHED, RECIPE, EXAMPLE = 'published', 'not published (recipe)', 'not published (example)'
# The tasks and metric names mmdet's and mmseg's own metafiles use.
TASK_METRICS = {
    'mmdet': {
        'Object Detection': {'box AP'},
        'Instance Segmentation': {'mask AP'},
        'Panoptic Segmentation': {'PQ'},
        'Semantic Segmentation': {'mIoU'},
    },
    'mmseg': {'Semantic Segmentation': {'mIoU', 'mIoU(ms+flip)'}},
}
# config folder -> (name in the zoo, backbone type in the configs)
FAMILIES = {'nat': ('NAT', 'NAT'), 'dinat': ('DiNAT', 'DiNAT'), 'dinat_s': ('DiNAT_s', 'DiNATs')}
BACKBONE = re.compile(
    r'^(?P<family>NAT|DiNAT|DiNAT_s)-(?P<size>Mini|Tiny|Small|Base|Large|L 11x11)$'
)
ARCH = re.compile(r'(?:nat|dinats?)-(mini|tiny|small|base|large)')


def read_entries() -> list[dict]:
    """Every model entry of every metafile, with the metafile it came from."""
    return [
        dict(model, _metafile=metafile)
        for metafile in METAFILES
        for model in yaml.safe_load(metafile.read_text())['Models']
    ]


ENTRIES = read_entries()
ENTRY_IDS = [entry['Name'] for entry in ENTRIES]


def family_of(entry: dict) -> str:
    return entry['_metafile'].parent.name  # nat, dinat or dinat_s


def scope_of(entry: dict) -> str:
    return entry['_metafile'].parts[-3]  # mmdet or mmseg


def expected_status(name: str) -> str:
    if name.startswith('retinanet_') or '_segformer-head_' in name:
        return EXAMPLE
    if '-1x_' in name or name.startswith('mask2former_nat-'):
        return RECIPE  # 1x Mask R-CNN, NAT-Tiny Mask2Former: upstream never trained them
    return PUBLISHED


# mask2former/README.md (its YAML files and checkpoints, by our config name)
MASK2FORMER_UPSTREAM = {
    'mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco-panoptic': (
        'coco/panoptic-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_100ep.yaml',
        'mask2former_dinat_large_coco_panoptic.pth',
    ),
    'mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco': (
        'coco/instance-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_100ep.yaml',
        'mask2former_dinat_large_coco_instance.pth',
    ),
    'mask2former_dinat-large-k11-in22k_8xb2-160k_ade20k-640x640': (
        'ade20k/semantic-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_160k.yaml',
        'mask2former_dinat_large_ade20k_semantic.pth',
    ),
    'mask2former_dinat-large-k11-in22k_8xb2-160k_ade20k-panoptic': (
        'ade20k/panoptic-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_160k.yaml',
        'mask2former_dinat_large_ade20k_panoptic.pth',
    ),
    'mask2former_dinat-large-k11-in22k_8xb2-160k_ade20k-instance': (
        'ade20k/instance-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_160k.yaml',
        'mask2former_dinat_large_ade20k_instance.pth',
    ),
    'mask2former_dinat-large-k11-in22k_8xb2-90k_cityscapes-instance': (
        'cityscapes/instance-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_90k.yaml',
        'mask2former_dinat_large_cityscapes_instance.pth',
    ),
    'mask2former_dinat-large-k11-in22k_8xb2-90k_cityscapes-512x1024': (
        'cityscapes/semantic-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_90k.yaml',
        'mask2former_dinat_large_cityscapes_semantic.pth',
    ),
}
# The training set's dataset type -> the metafile's Training Data.
TRAINING_DATA = {
    'CocoDataset': 'COCO',
    'CocoPanopticDataset': 'COCO',
    'ADE20KDataset': 'ADE20K',
    'ADE20KPanopticDataset': 'ADE20K',
    'ADE20KInstanceDataset': 'ADE20K',
    'CityscapesDataset': 'Cityscapes',
}


def upstream_files(family: str, name: str) -> tuple[str, str]:
    """(upstream config path, trained-weights URL) of a published model, by upstream's naming:
    NAT's under projects/nat/checkpoints/{DET,SEG}/nat_<arch>_<head>.pth, DiNAT's and DiNAT_s's
    under projects/dinat/checkpoints/{coco,ade20k}/<head>_<family>_<arch>.pth (Cascade spelled
    'cascadedmaskrcnn'), Mask2Former's under projects/dinat/checkpoints/m2f/."""
    if name in MASK2FORMER_UPSTREAM:
        config, weights = MASK2FORMER_UPSTREAM[name]
        return (
            f'mask2former/configs/{config}',
            f'https://shi-labs.com/projects/dinat/checkpoints/m2f/{weights}',
        )
    arch = ARCH.search(name)[1]
    if name.startswith('cascade-mask-rcnn_'):
        config = f'detection/configs/{family}/cascade_mask_rcnn_{family}_{arch}_3x_coco.py'
        nat_file, dinat_file = (
            f'DET/nat_{arch}_cascademaskrcnn',
            f'coco/cascadedmaskrcnn_{family}_{arch}',
        )
    elif name.startswith('mask-rcnn_'):
        config = f'detection/configs/{family}/mask_rcnn_{family}_{arch}_3x_coco.py'
        nat_file, dinat_file = f'DET/nat_{arch}_maskrcnn', f'coco/maskrcnn_{family}_{arch}'
    else:  # UPerNet; the Large files are named 640x640 upstream (docs/original-models.md)
        crop = '640x640' if arch == 'large' else '512x512'
        config = f'segmentation/configs/{family}/upernet_{family}_{arch}_{crop}_160k_ade20k.py'
        nat_file, dinat_file = f'SEG/nat_{arch}_upernet', f'ade20k/upernet_{family}_{arch}'
    if family == 'nat':
        return config, f'https://shi-labs.com/projects/nat/checkpoints/{nat_file}.pth'
    return config, f'https://shi-labs.com/projects/dinat/checkpoints/{dinat_file}.pth'


def metrics_of(entry: dict) -> dict[str, float]:
    return {k: v for result in entry.get('Results', []) for k, v in result['Metrics'].items()}


# ----------------------------------------------------------------------------- the metafiles


def test_model_index_loads_with_modelindex_without_check_errors():
    index = load_model_index(str(ROOT / 'model-index.yml'))
    errors = [e for e in index.collect_check_errors() if e['errors']]
    assert errors == []
    assert sorted(m.name for m in index.models) == sorted(ENTRY_IDS)
    assert len(set(ENTRY_IDS)) == len(ENTRY_IDS)
    names = [c.name for c in index.collections]
    assert len(set(names)) == len(names)
    for model in index.models:
        assert model.in_collection in names
        full = model.full_model  # the collection's fields merged in, as tools read them
        assert full.paper == (NAT_PAPER if '/nat/' in model.config else DINAT_PAPER)
        assert full.metadata.training_data and full.metadata.architecture
        assert full.metadata.parameters.endswith('M') and full.metadata.flops.endswith('G')


def test_model_index_imports_every_metafile_and_every_config_folder_has_one():
    imports = yaml.safe_load((ROOT / 'model-index.yml').read_text())['Import']
    assert sorted(imports) == [str(p.relative_to(ROOT)) for p in METAFILES]
    folders = {p.parent for scope in ('mmdet', 'mmseg') for p in (CONFIGS / scope).rglob('*.py')}
    assert folders == {p.parent for p in METAFILES}


def test_every_config_has_exactly_one_entry():
    counts = collections.Counter(entry['Config'] for entry in ENTRIES)
    assert [config for config, n in counts.items() if n != 1] == []
    configs = {
        str(path.relative_to(ROOT))
        for scope in ('mmdet', 'mmseg')
        for path in (CONFIGS / scope).rglob('*.py')
    }
    assert set(counts) == configs
    for entry in ENTRIES:
        config = ROOT / entry['Config']
        assert config.is_file() and config.parent == entry['_metafile'].parent
        assert entry['Name'] == config.stem


def test_collections_name_their_paper_and_upstream_code():
    for metafile in METAFILES:
        data = yaml.safe_load(metafile.read_text())
        paper = NAT_PAPER if metafile.parent.name == 'nat' else DINAT_PAPER
        for collection in data['Collections']:
            assert collection['Paper'] == paper, collection['Name']
            meta = collection['Metadata']
            for key in ('Training Data', 'Training Techniques', 'Training Resources'):
                assert meta[key], (collection['Name'], key)
            assert meta['Architecture'][0] in ('NAT', 'DiNAT', 'DiNAT_s')
            assert collection['Code']['URL'].startswith(UPSTREAM_BLOB)
            assert (metafile.parent / collection['README']).resolve() == CONFIGS / 'README.md'
        used = {model['In Collection'] for model in data['Models']}
        assert used == {c['Name'] for c in data['Collections']}, metafile  # none unused or foreign


@pytest.mark.parametrize('entry', ENTRIES, ids=ENTRY_IDS)
def test_status_says_whether_upstream_published_the_model(entry):
    status = entry['Metadata']['Status']
    assert status == expected_status(entry['Name'])
    published = status == PUBLISHED
    assert ('Results' in entry) is published and ('Weights' in entry) is published
    assert ('Upstream Parameters' in entry['Metadata']) is ('Upstream FLOPs' in entry['Metadata'])
    if not published:  # upstream never counted a model it did not publish
        assert 'Upstream Parameters' not in entry['Metadata'] and 'Code' not in entry


@pytest.mark.parametrize('entry', ENTRIES, ids=ENTRY_IDS)
def test_results_use_the_host_library_vocabulary(entry):
    allowed = TASK_METRICS[scope_of(entry)]
    for result in entry.get('Results', []):
        assert result['Dataset'] == entry['Metadata']['Training Data']
        assert set(result['Metrics']) <= allowed[result['Task']], result
        for value in result['Metrics'].values():
            assert isinstance(value, float) and 0 < value < 100 and round(value, 1) == value


@pytest.mark.parametrize(
    'entry',
    [e for e in ENTRIES if 'Weights' in e],
    ids=[e['Name'] for e in ENTRIES if 'Weights' in e],
)
def test_weights_and_code_are_upstreams(entry):
    config, weights = upstream_files(family_of(entry), entry['Name'])
    url = urlparse(entry['Weights'])
    assert (url.scheme, url.netloc) == ('https', 'shi-labs.com')
    assert entry['Weights'] == weights
    assert entry['Code'] == {'URL': UPSTREAM_BLOB + config, 'Version': UPSTREAM_COMMIT[:7]}


@pytest.mark.parametrize('entry', ENTRIES, ids=ENTRY_IDS)
def test_pretrained_weights_are_upstreams_imagenet_checkpoints(entry):
    meta = entry['Metadata']
    url = urlparse(meta['Pre-trained Weights'])
    assert (url.scheme, url.netloc) == ('https', 'shi-labs.com')
    folder = {'ImageNet-1K': ('CLS', 'imagenet1k'), 'ImageNet-22K': ('imagenet22k',)}
    assert url.path.split('/')[-2] in folder[meta['Pre-training']]
    # every Large model was fine-tuned from ImageNet-22K, every other one from ImageNet-1K
    assert (meta['Pre-training'] == 'ImageNet-22K') is (ARCH.search(entry['Name'])[1] == 'large')


# ----------------------------------------------------------------------------- configs/README.md

TABLE_ROW = re.compile(
    r'^\| \[(?P<text>[^\]]+)\]\((?P<target>[^)]+)\)(?P<example> \(example\))? \| (?P<rest>.*) \|$'
)


def readme_tables() -> list[list[dict]]:
    """The zoo tables of configs/README.md: one list of rows per table, cells by column name."""
    tables, header = [], None
    for line in (CONFIGS / 'README.md').read_text().splitlines():
        if line.startswith('| config | backbone | published |'):
            header = [c.strip() for c in line.strip('|').split('|')][1:]
            tables.append([])
        elif header and (match := TABLE_ROW.match(line)):
            cells = [c.strip() for c in match['rest'].split(' | ')]
            assert len(cells) == len(header), line
            tables[-1].append(dict(match.groupdict(), **dict(zip(header, cells, strict=True))))
        elif not line.startswith('|'):
            header = None
    return tables


def published_cell(entry: dict) -> str:
    """The README notation of an entry's published numbers."""
    m = {k: f'{v:.1f}' for k, v in metrics_of(entry).items()}
    notation = {
        (): '-',
        ('box AP', 'mask AP'): lambda: f'{m["box AP"]} / {m["mask AP"]}',
        ('mIoU', 'mIoU(ms+flip)'): lambda: f'{m["mIoU"]} / {m["mIoU(ms+flip)"]}',
        ('PQ', 'mIoU', 'mask AP'): lambda: f'PQ {m["PQ"]} (AP {m["mask AP"]}, mIoU {m["mIoU"]})',
        ('mask AP',): lambda: f'mask AP {m["mask AP"]}',
        ('mIoU(ms+flip)',): lambda: f'mIoU {m["mIoU(ms+flip)"]} (ms)',
    }[tuple(sorted(m))]
    return notation if isinstance(notation, str) else notation()


def test_readme_zoo_tables_equal_the_metafiles():
    zoo, dinat_s = readme_tables()
    by_config = {entry['Config']: entry for entry in ENTRIES}
    rows = {'configs/' + row['target']: row for row in zoo + dinat_s}
    assert len(rows) == len(zoo) + len(dinat_s)  # no config listed twice
    assert set(rows) == set(by_config)
    assert {'configs/' + row['target'] for row in dinat_s} == {
        e['Config'] for e in ENTRIES if family_of(e) == 'dinat_s'
    }
    for config, row in rows.items():
        entry, meta = by_config[config], by_config[config]['Metadata']
        name, text = entry['Name'], row['text']
        if '_..._' in text:  # a shortened name: its two ends
            head, tail = text.split('_..._')
            assert name.startswith(head) and name.endswith(tail), text
            assert len(head) + len(tail) < len(name), text
        else:
            assert text == name
        assert bool(row['example']) is (meta['Status'] == EXAMPLE), name
        pretraining = ' (22k)' if meta['Pre-training'] == 'ImageNet-22K' else ''
        assert row['backbone'] == meta['Backbone'] + pretraining, name
        assert re.sub(r' [¹²³]$', '', row['published']) == published_cell(entry), name
        assert row['params (M)'] == meta['Parameters'].removesuffix('M'), name
        assert row['GFLOPs'] == meta['FLOPs'].removesuffix('G'), name
        upstream = '-'
        if 'Upstream Parameters' in meta:
            upstream = f'{meta["Upstream Parameters"]} / {meta["Upstream FLOPs"]}'
        assert row['upstream'] == upstream, name
        if 'upstream file' in row:
            assert row['upstream file'] == '`{}`'.format(entry['Code']['URL'][len(UPSTREAM_BLOB) :])
        weights = f'[download]({entry["Weights"]})' if 'Weights' in entry else '-'
        assert row['weights'] == weights, name


# ----------------------------------------------------------------------------- the configs


@pytest.fixture(scope='module')
def built_configs() -> dict:
    """Every entry's config, built with mmengine's ``Config.fromfile`` (models are built in
    tests/test_configs*.py)."""
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    pytest.importorskip('mmseg', reason='mmsegmentation is not installed')
    import mmengine.config.utils
    from mmengine.config import Config

    with pytest.MonkeyPatch.context() as patch:
        # mmengine re-reads all of mmdet's / mmseg's metafiles for every `mmdet::` base it
        # resolves (about a second a config); reading each file once changes no result.
        patch.setattr(mmengine.config.utils, 'load', functools.cache(mmengine.config.utils.load))
        return {entry['Config']: Config.fromfile(ROOT / entry['Config']) for entry in ENTRIES}


@pytest.mark.parametrize('entry', ENTRIES, ids=ENTRY_IDS)
def test_metafile_agrees_with_its_config(entry, built_configs):
    cfg, meta = built_configs[entry['Config']], entry['Metadata']
    if 'Epochs' in meta:
        assert (cfg.train_cfg.type, cfg.train_cfg.max_epochs) == (
            'EpochBasedTrainLoop',
            meta['Epochs'],
        )
    else:
        assert (cfg.train_cfg.type, cfg.train_cfg.max_iters) == (
            'IterBasedTrainLoop',
            meta['Iterations'],
        )
    if 'auto_scale_lr' in cfg:  # mmdet's configs say their total batch
        assert cfg.auto_scale_lr.base_batch_size == meta['Batch Size']
    else:  # mmseg's say it in their names: GPUs x images per GPU
        gpus, per_gpu = map(int, re.search(r'_(\d+)xb(\d+)-', entry['Name']).groups())
        assert cfg.train_dataloader.batch_size == per_gpu and gpus * per_gpu == meta['Batch Size']
    techniques = set(meta['Training Techniques'])
    assert ('AdamW' in techniques) is (cfg.optim_wrapper.optimizer.type == 'AdamW')
    amp = cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert ('Mixed Precision Training' in techniques) is amp
    dataset = cfg.train_dataloader.dataset.type
    assert meta['Training Data'] == TRAINING_DATA[dataset], dataset

    backbone = cfg.model.backbone
    match = BACKBONE.match(meta['Backbone'])
    assert match and (match['family'], backbone.type) == FAMILIES[family_of(entry)]
    size = match['size'].lower()
    assert backbone.arch == ('large' if size == 'l 11x11' else size)
    assert (backbone.get('kernel_size', 7) == 11) is (size == 'l 11x11')
    checkpoint = Path(backbone.init_cfg.checkpoint).name
    assert checkpoint == Path(urlparse(meta['Pre-trained Weights']).path).name


# ----------------------------------------------------------------------------- nat_mm/.mim


def test_mim_folder_links_the_repository_zoo():
    mim = ROOT / 'nat_mm' / '.mim'
    for name, target in (('model-index.yml', ROOT / 'model-index.yml'), ('configs', CONFIGS)):
        link = mim / name
        # relative, so that a copy of the tree (a wheel build) resolves it too
        assert link.is_symlink() and not Path(link.readlink()).is_absolute()
        assert link.resolve() == target
    # What setuptools copies into a wheel: package-data globs relative to nat_mm/.
    tomllib = pytest.importorskip('tomllib', reason='Python < 3.11 has no tomllib')
    patterns = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools'][
        'package-data'
    ]['nat_mm']
    shipped = {
        path
        for pattern in patterns
        for path in glob.glob(pattern, root_dir=ROOT / 'nat_mm', recursive=True)
    }
    wanted = (
        {'.mim/model-index.yml'}
        | {f'.mim/{entry["Config"]}' for entry in ENTRIES}
        | {f'.mim/{p.relative_to(ROOT)}' for p in METAFILES}
    )
    assert wanted <= shipped


# What a wheel build of a copy of the tree leaves out: the repository root's git, environment,
# build and run folders (nat_mm/data is a package), and caches anywhere.
ROOT_ONLY = {
    '.git',
    '.venv',
    'build',
    'work_dirs',
    'data',
    'checkpoints',
    'outputs',
    '.device_wheels',
}
CACHES = {'__pycache__', '.pytest_cache', '.ruff_cache'}


def ignored_in_copy(folder: str, names: list[str]) -> set[str]:
    at_root = Path(folder) == ROOT
    return {
        name
        for name in names
        if (at_root and name in ROOT_ONLY) or name in CACHES or name.endswith('.egg-info')
    }


@pytest.mark.slow
def test_wheel_ships_the_zoo_and_mim_search_lists_it(tmp_path):
    source = tmp_path / 'src'  # a copy: a wheel build writes build/ and *.egg-info in its tree
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignored_in_copy)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    build = [*pip, 'wheel', '--no-deps', '--no-build-isolation', str(source), '-w', str(tmp_path)]
    subprocess.run(build, check=True, timeout=600)
    (wheel,) = tmp_path.glob('nat_mm-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    wanted = (
        {'nat_mm/.mim/model-index.yml'}
        | {f'nat_mm/.mim/{p.relative_to(ROOT)}' for p in METAFILES}
        | {f'nat_mm/.mim/{entry["Config"]}' for entry in ENTRIES}
    )
    assert wanted <= names

    if importlib.util.find_spec('mim') is None:
        pytest.skip('openmim (dev extra) is not installed: the wheel was checked, mim not run')
    # A regular install of the wheel in a fresh environment that sees this one's packages (mim,
    # mmdet, ...) after its own: mim finds nat_mm/.mim beside the installed distribution.
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    (target,) = venv.glob('lib/python*/site-packages')
    (target / 'outer.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    subprocess.run([*pip, 'install', '--no-deps', '--target', str(target), str(wheel)], check=True)
    found = tmp_path / 'found.json'
    search = [str(venv / 'bin' / 'python'), '-m', 'mim', 'search', 'nat_mm', '--json', str(found)]
    result = subprocess.run(search, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = json.loads(found.read_text())  # pandas' to_json: {field: {config id: value}}
    assert set(listed['config']) == set(ENTRY_IDS)
    for entry in ENTRIES:
        assert listed['config'][entry['Name']] == entry['Config']
        assert listed['weight'][entry['Name']] == entry.get('Weights')
        assert listed['status'][entry['Name']] == entry['Metadata']['Status']
