# UPerNet + a small DiNAT (embed_dim 32, depths 2-2-2-1, kernel 7, dilations up to 4) on the
# embedded demo data (tools/make_data.py: ADE20K layout and reduce_zero_label semantics; 5 classes).
# CPU-sized: BN instead of SyncBN, 64-channel heads, fp32 OptimWrapper, no workers.
# Trained from scratch by tools/main_job.py in a few minutes on 2 cores.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
]

# nat_mm.evaluation: ClasswiseIoUMetric (mmseg's IoUMetric, its per-class table in the results).
custom_imports = dict(
    imports=['nat_mm', 'nat_mm.models', 'nat_mm.evaluation'], allow_failed_imports=False
)

data_root = 'data/nat_mm_demo/ade/ADEChallengeData2016'
classes = ('wall', 'floor', 'circle', 'square', 'triangle')
palette = [[120, 120, 120], [80, 50, 50], [230, 25, 75], [60, 180, 75], [0, 130, 200]]
crop_size = (128, 128)
max_iters = 400
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='DiNAT',
        embed_dim=32,
        depths=(2, 2, 2, 1),
        num_heads=(1, 2, 4, 8),
        mlp_ratio=3.0,
        kernel_size=7,
        # Stage maps are 32, 16, 8, 4 tokens wide at 128 px: dilation * 7 must fit for 1, 2.
        dilations=((1, 4), (1, 2), (1, 1), (1,)),
        # No stochastic depth: it regularizes long runs of large models, and only slows the
        # 400 iterations of this one.
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
        init_cfg=None,
    ),
    decode_head=dict(
        in_channels=[32, 64, 128, 256],
        channels=64,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
    ),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=len(classes), norm_cfg=norm_cfg),
)

# ADE20KDataset refuses classes outside ADE's 150 names; BaseSegDataset with ADE20KDataset's
# suffixes and reduce_zero_label reads the same folders with the demo's own class list.
dataset_type = 'BaseSegDataset'
dataset_settings = dict(
    type=dataset_type,
    data_root=data_root,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True,
    metainfo=dict(classes=classes, palette=palette),
)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),  # reduce_zero_label comes from the dataset
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),  # reduce_zero_label comes from the dataset
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **dataset_settings,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        **dataset_settings,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='ClasswiseIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=50, end=max_iters),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)

# mmseg keeps its default hooks in the schedule bases, which this config does not inherit.
runner_type = 'SafeLoadRunner'  # docs/checkpoints.md
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CrashSafeCheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'),
)
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer'
)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
