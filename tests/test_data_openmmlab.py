"""The demo data through the host libraries' own dataset classes and metrics.

Perfect predictions (the ground truth as loaded by mmdet / mmseg) must score bbox and segm
mAP 1.0 and mIoU 100: this checks boxes, polygons, RLE and label maps end to end.
"""

import os.path as osp

import pytest
import torch

from nat_mm.data import ADE_SUBDIR, THING_CLASSES, DemoDataSettings, ade_classes
from nat_mm.data import generate_demo_datasets as generate

pytest.importorskip('pycocotools', reason='pycocotools is needed to read COCO annotations')
SETTINGS = DemoDataSettings(num_train=3, num_val=4, height=64, width=96, seed=11)


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo_mm'))
    generate(root, SETTINGS)
    return root


def test_coco_instances_load_and_score_perfectly(demo_root):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric
    from mmdet.utils import register_all_modules

    register_all_modules()
    ann_file = osp.join(demo_root, 'coco', 'annotations', 'instances_val2017.json')
    dataset = CocoDataset(
        data_root=osp.join(demo_root, 'coco'),
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        metainfo=dict(classes=THING_CLASSES),
        test_mode=True,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        ],
    )
    assert len(dataset) == SETTINGS.num_val
    metric = CocoMetric(ann_file=ann_file, metric=['bbox', 'segm'])
    metric.dataset_meta = dataset.metainfo
    instance_count = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample['img'].shape == (SETTINGS.height, SETTINGS.width, 3)
        boxes = sample['gt_bboxes'].tensor
        masks = torch.from_numpy(sample['gt_masks'].to_ndarray()).bool()
        assert masks.shape[1:] == (SETTINGS.height, SETTINGS.width)
        assert (masks.flatten(1).sum(1) > 0).all()
        instance_count += len(boxes)
        prediction = dict(
            bboxes=boxes,
            scores=torch.ones(len(boxes)),
            labels=torch.from_numpy(sample['gt_bboxes_labels']).long(),
            masks=masks,
        )
        metric.process(
            {},
            [
                dict(
                    img_id=sample['img_id'],
                    ori_shape=sample['ori_shape'],
                    pred_instances=prediction,
                )
            ],
        )
    assert instance_count > SETTINGS.num_val
    scores = metric.evaluate(size=len(dataset))
    assert scores['coco/bbox_mAP'] == pytest.approx(1.0)
    assert scores['coco/segm_mAP'] == pytest.approx(1.0)


def test_coco_panoptic_loads(demo_root):
    pytest.importorskip('mmdet', reason='mmdet is not installed')
    from mmdet.datasets import CocoPanopticDataset

    dataset = CocoPanopticDataset(
        data_root=osp.join(demo_root, 'coco'),
        ann_file='annotations/panoptic_val2017.json',
        data_prefix=dict(img='val2017/', seg='annotations/panoptic_val2017/'),
        metainfo=dict(
            classes=(*THING_CLASSES, 'wall', 'floor'),
            thing_classes=THING_CLASSES,
            stuff_classes=('wall', 'floor'),
        ),
        test_mode=True,
        pipeline=[],
    )
    assert len(dataset) == SETTINGS.num_val
    info = dataset.get_data_info(0)
    assert osp.isfile(info['img_path']) and osp.isfile(info['seg_map_path'])
    thing_ids = set(range(len(THING_CLASSES)))
    labels = [segment['category'] for segment in info['segments_info']]
    assert thing_ids & set(labels), 'every scene has at least one object'
    assert all(0 <= label < len(THING_CLASSES) + 2 for label in labels)


@pytest.mark.parametrize('dataset_type', ['ADE20KDataset', 'BaseSegDataset'])
def test_ade20k_loads_and_scores_perfectly(demo_root, dataset_type):
    """ADE20KDataset as is (150 class names), and BaseSegDataset with the demo's 5 classes."""
    pytest.importorskip('mmseg', reason='mmsegmentation is not installed')
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    register_all_modules()
    # The demo configs use BaseSegDataset: ADE20KDataset refuses names outside its 150.
    extra = {} if dataset_type == 'ADE20KDataset' else dict(
        img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
        metainfo=dict(classes=ade_classes()),
    )  # fmt: skip
    dataset = DATASETS.build(
        dict(
            type=dataset_type,
            data_root=osp.join(demo_root, ADE_SUBDIR),
            data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
            test_mode=True,
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', reduce_zero_label=True),
                dict(type='PackSegInputs'),
            ],
            **extra,
        )
    )
    assert len(dataset) == SETTINGS.num_val
    metric = IoUMetric(iou_metrics=['mIoU'])
    metric.dataset_meta = dataset.metainfo
    seen_labels = set()
    for index in range(len(dataset)):
        sample = dataset[index]['data_samples']
        labels = sample.gt_sem_seg.data
        seen_labels |= set(labels.unique().tolist())
        metric.process({}, [dict(pred_sem_seg=dict(data=labels), gt_sem_seg=dict(data=labels))])
    assert seen_labels <= set(range(len(ade_classes()))) | {255}
    assert {0, 1} <= seen_labels, 'wall and floor are in every scene'
    assert 255 in seen_labels, 'clutter (label 0 on disk) is ignored after reduce_zero_label'
    scores = metric.evaluate(size=len(dataset))
    assert scores['mIoU'] == pytest.approx(100.0)
