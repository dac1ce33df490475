# Mask2Former + DiNAT-Large 11x11 (ImageNet-22k, RPB interpolated to kernel 11), Cityscapes
# instance segmentation, AP 45.1 (Cityscapes' own AP): the published recipe (NAT repo
# mask2former/configs/cityscapes/instance-segmentation/dinat/
# maskformer2_dinat_large_IN21k_384_bs16_90k.yaml, detectron2): the COCO instance DiNAT-L model
# (kernel 11, 'mask2former' dilations, drop_path 0.3, 200 queries, fp32, batch 8 x 2,
# Mask2Former's optimizer) on Cityscapes' 8 thing classes, crop 512 x 1024, 90k iterations of
# poly lr. Data and metrics as mmdet's _base_/datasets/cityscapes_instance.py (annotations made by
# mmdet's tools/dataset_converters/cityscapes.py; CityScapesMetric needs `cityscapesscripts`).
_base_ = ['./mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco.py']

num_things_classes = 8

model = dict(
    # SIZE_DIVISIBILITY -1: no fixed-size pad. Every training crop is 512 x 1024 anyway (the
    # smallest scale of a 2048 x 1024 image is 1024 x 512); batches pad to a multiple of 32.
    data_preprocessor=dict(batch_augments=None),
    panoptic_head=dict(
        num_things_classes=num_things_classes,
        num_stuff_classes=0,
        loss_cls=dict(class_weight=[1.0] * num_things_classes + [0.1]),
    ),
    panoptic_fusion_head=dict(num_things_classes=num_things_classes, num_stuff_classes=0),
)

# detectron2's ResizeShortestEdge (short side 512-2048, long side <= 4096), absolute crop
# 512 x 1024 (mmdet's crop_size is (w, h)), SSD colour jitter (PhotoMetricDistortion's defaults)
# and flip, in upstream's order.
train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True, backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='RandomChoiceResize',
        scales=[int(x * 0.1 * 1024) for x in range(5, 21)],
        resize_type='ResizeShortestEdge',
        max_size=4096,
    ),
    dict(
        type='RandomCrop',
        crop_size=(1024, 512),
        crop_type='absolute',
        recompute_bbox=True,
        allow_negative_crop=True,
    ),
    dict(type='FilterAnnotations', min_gt_bbox_wh=(1e-5, 1e-5), by_mask=True),
    dict(type='PhotoMetricDistortion'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
# Test: short side 1024, long side <= 2048 (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), as mmdet's base.
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(2048, 1024), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]

dataset_type = 'CityscapesDataset'
data_root = 'data/cityscapes/'
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instancesonly_filtered_gtFine_train.json',
        data_prefix=dict(img='leftImg8bit/train/'),
        # DATALOADER.FILTER_EMPTY_ANNOTATIONS: images without (non-crowd) instances are dropped.
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
        backend_args=None,
    )
)
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instancesonly_filtered_gtFine_val.json',
        data_prefix=dict(img='leftImg8bit/val/'),
        test_mode=True,
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=test_pipeline,
        backend_args=None,
    )
)
test_dataloader = val_dataloader
# The published AP is Cityscapes' (CityScapesMetric); CocoMetric adds COCO-style box / mask AP.
val_evaluator = [
    dict(
        type='CocoMetric',
        ann_file=data_root + 'annotations/instancesonly_filtered_gtFine_val.json',
        metric=['bbox', 'segm'],
        backend_args=None,
    ),
    dict(
        type='CityScapesMetric',
        seg_prefix=data_root + 'gtFine/val',
        outfile_prefix='./work_dirs/cityscapes_metric/instance',
        backend_args=None,
    ),
]
test_evaluator = val_evaluator

# 90k iterations at batch 16, poly lr (power 0.9) without warm-up (SOLVER.LR_SCHEDULER_NAME
# WarmupPolyLR, WARMUP_ITERS 0), evaluation every 5000 (TEST.EVAL_PERIOD).
max_iters = 90000
param_scheduler = dict(
    _delete_=True, type='PolyLR', eta_min=0, power=0.9, begin=0, end=max_iters, by_epoch=False
)
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=5000)
