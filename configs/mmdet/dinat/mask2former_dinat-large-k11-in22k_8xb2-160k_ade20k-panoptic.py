# Mask2Former + DiNAT-Large 11x11 (ImageNet-22k, RPB interpolated to kernel 11), ADE20K panoptic,
# PQ 49.4 (AP 35.0, mIoU 56.3): the published recipe (NAT repo mask2former/configs/ade20k/
# panoptic-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_160k.yaml, detectron2):
# the COCO panoptic DiNAT-L model (kernel 11, 'mask2former' dilations, drop_path 0.3, 200
# queries, fp32, batch 8 x 2, Mask2Former's optimizer) on ADE20K's 100 things + 50 stuff, crop
# 640, 160k iterations of poly lr. Data as mmdet's _base_/datasets/ade20k_panoptic.py (made by
# mmdet's tools/dataset_converters/ade20k2coco.py, which orders the categories things first).
_base_ = ['./mask2former_dinat-large-k11-in22k_8xb2-lsj-100e_coco-panoptic.py']

num_things_classes = 100
num_stuff_classes = 50
num_classes = num_things_classes + num_stuff_classes
crop_size = (640, 640)  # INPUT.CROP.SIZE (h, w); SIZE_DIVISIBILITY 640 pads every crop to it

model = dict(
    data_preprocessor=dict(
        batch_augments=[
            dict(
                type='BatchFixedSizePad',
                size=crop_size,
                img_pad_value=0,
                pad_mask=True,
                mask_pad_value=0,
                pad_seg=True,
                seg_pad_value=255,
            )
        ]
    ),
    panoptic_head=dict(
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        loss_cls=dict(class_weight=[1.0] * num_classes + [0.1]),
    ),
    panoptic_fusion_head=dict(
        num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes
    ),
    # Upstream also evaluates instance (AP 35.0) and semantic (mIoU 56.3) outputs. mmdet 3.3 has
    # no semantic output (see the COCO panoptic config), and its CocoMetric cannot score this
    # model's instances against ade20k_instance_val.json: it maps labels to categories by class
    # name, and ADE20KPanopticDataset's names are not the instance file's (configs/README.md).
    test_cfg=dict(panoptic_on=True, instance_on=False, semantic_on=False),
)

# detectron2's ResizeShortestEdge (short side 320-1280, long side <= 2560), absolute crop, SSD
# colour jitter (PhotoMetricDistortion's defaults) and flip, in upstream's order.
train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True, backend_args=None),
    dict(
        type='LoadPanopticAnnotations',
        with_bbox=True,
        with_mask=True,
        with_seg=True,
        backend_args=None,
    ),
    dict(
        type='RandomChoiceResize',
        scales=[int(x * 0.1 * 640) for x in range(5, 21)],
        resize_type='ResizeShortestEdge',
        max_size=2560,
    ),
    dict(
        type='RandomCrop',
        crop_size=crop_size,
        crop_type='absolute',
        recompute_bbox=True,
        allow_negative_crop=True,
    ),
    dict(type='PhotoMetricDistortion'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
# Test: short side 640, long side <= 2560 (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), as mmdet's base.
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(2560, 640), keep_ratio=True),
    dict(type='LoadPanopticAnnotations', backend_args=None),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]

dataset_type = 'ADE20KPanopticDataset'
data_root = 'data/ADEChallengeData2016/'
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='ade20k_panoptic_train.json',
        data_prefix=dict(img='images/training/', seg='ade20k_panoptic_train/'),
        # detectron2 filters only datasets with instance annotations; panoptic ones keep every
        # image (also those without things).
        filter_cfg=dict(filter_empty_gt=False, min_size=32),
        pipeline=train_pipeline,
        backend_args=None,
    )
)
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type=dataset_type,
        data_root=data_root,
        ann_file='ade20k_panoptic_val.json',
        data_prefix=dict(img='images/validation/', seg='ade20k_panoptic_val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=None,
    )
)
test_dataloader = val_dataloader
val_evaluator = dict(
    _delete_=True,
    type='CocoPanopticMetric',
    ann_file=data_root + 'ade20k_panoptic_val.json',
    seg_prefix=data_root + 'ade20k_panoptic_val/',
    backend_args=None,
)
test_evaluator = val_evaluator

# 160k iterations at batch 16, poly lr (power 0.9) without warm-up (SOLVER.LR_SCHEDULER_NAME
# WarmupPolyLR, WARMUP_ITERS 0), evaluation every 5000 (TEST.EVAL_PERIOD).
max_iters = 160000
param_scheduler = dict(
    _delete_=True, type='PolyLR', eta_min=0, power=0.9, begin=0, end=max_iters, by_epoch=False
)
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=5000)
