# Mask2Former + a small NAT (embed_dim 32, depths 1-1-2-1, kernel 7) on the embedded demo data
# (tools/make_data.py: COCO panoptic format; things circle / square / triangle, stuff wall / floor).
# CPU-sized: 128 px images padded to a multiple of 32 only (no 1024 batch padding), 64-channel
# pixel decoder with 2 deformable encoder layers, 3 decoder layers, 12 queries, fp32, no workers.
# Trained from scratch by tools/main_job.py in a few minutes on 2 cores.
_base_ = ['mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py']

custom_imports = dict(imports=['nat_mm', 'nat_mm.models'], allow_failed_imports=False)

data_root = 'data/nat_mm_demo/coco/'
thing_classes = ('circle', 'square', 'triangle')
stuff_classes = ('wall', 'floor')
metainfo = dict(
    classes=thing_classes + stuff_classes,
    thing_classes=thing_classes,
    stuff_classes=stuff_classes,
    palette=[(230, 25, 75), (60, 180, 75), (0, 130, 200), (120, 120, 120), (80, 50, 50)],
)
num_things_classes, num_stuff_classes = len(thing_classes), len(stuff_classes)
num_classes = num_things_classes + num_stuff_classes
image_scale = (128, 128)
channels = 64
max_iters = 300

model = dict(
    data_preprocessor=dict(batch_augments=None),
    backbone=dict(
        _delete_=True,
        type='NAT',
        embed_dim=32,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        mlp_ratio=3.0,
        kernel_size=7,
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=None,
    ),
    panoptic_head=dict(
        in_channels=[32, 64, 128, 256],
        feat_channels=channels,
        out_channels=channels,
        num_things_classes=num_things_classes,
        num_stuff_classes=num_stuff_classes,
        num_queries=12,
        pixel_decoder=dict(
            norm_cfg=dict(type='GN', num_groups=8),
            encoder=dict(
                num_layers=2,
                layer_cfg=dict(
                    self_attn_cfg=dict(embed_dims=channels, num_heads=4),
                    ffn_cfg=dict(embed_dims=channels, feedforward_channels=4 * channels),
                ),
            ),
            positional_encoding=dict(num_feats=channels // 2),
        ),
        positional_encoding=dict(num_feats=channels // 2),
        transformer_decoder=dict(
            num_layers=3,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=channels, num_heads=4),
                cross_attn_cfg=dict(embed_dims=channels, num_heads=4),
                ffn_cfg=dict(embed_dims=channels, feedforward_channels=4 * channels),
            ),
        ),
        loss_cls=dict(class_weight=[1.0] * num_classes + [0.1]),
    ),
    panoptic_fusion_head=dict(
        num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes
    ),
    # Points sampled per mask for the matching and the mask losses: the masks are predicted at
    # 32 x 32 (stride 4 of 128 px), so 12544 points (for 1024 px crops) would oversample them.
    train_cfg=dict(num_points=1024),
    # Panoptic only: CocoPanopticMetric is the evaluation (no instance pass, no CocoMetric).
    test_cfg=dict(instance_on=False, max_per_image=20),
)

train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True),
    dict(type='LoadPanopticAnnotations', with_bbox=True, with_mask=True, with_seg=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadPanopticAnnotations'),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    _delete_=True,
    type='CocoPanopticMetric',
    ann_file=data_root + 'annotations/panoptic_val2017.json',
    seg_prefix=data_root + 'annotations/panoptic_val2017/',
)
test_evaluator = val_evaluator

train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters, dynamic_intervals=None
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, eta_min=1e-5),
]
# From scratch: the backbone learns at the full rate (the published recipe's 0.1 is for a
# pre-trained one); Mask2Former's no-decay embeddings and norms otherwise.
embed_multi = dict(lr_mult=1.0, decay_mult=0.0)
optim_wrapper = dict(
    optimizer=dict(lr=5e-4),
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            'rpb': dict(decay_mult=0.0),
            'query_embed': embed_multi,
            'query_feat': embed_multi,
            'level_embed': embed_multi,
        },
        norm_decay_mult=0.0,
    ),
    clip_grad=dict(max_norm=1.0, norm_type=2),
)

runner_type = 'SafeLoadRunner'  # docs/checkpoints.md
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(
        type='CrashSafeCheckpointHook',
        by_epoch=False,
        interval=150,
        max_keep_ckpts=2,
        save_last=True,
    ),
)
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
