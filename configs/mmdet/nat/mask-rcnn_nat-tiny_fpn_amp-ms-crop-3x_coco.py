# Mask R-CNN + NAT-Tiny, COCO 3x (36 epochs), DETR-style multi-scale crop: the published recipe
# (NAT repo detection/configs/nat/mask_rcnn_nat_tiny_3x_coco.py, mmdet 2.x) on mmdet 3.x.
# Box / mask AP 47.7 / 42.6. Family root: the other sizes override only what differs.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']

custom_imports = dict(imports=['nat_mm'], allow_failed_imports=False)

# nat_mm's runtime (docs/checkpoints.md): checkpoints are read without running code from them
# and saved so that a kill never loses the last complete one.
runner_type = 'SafeLoadRunner'
default_hooks = dict(checkpoint=dict(type='CrashSafeCheckpointHook'))

model = dict(
    backbone=dict(
        _delete_=True,
        type='NAT',
        arch='tiny',
        kernel_size=7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_tiny.pth'),
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)

# Published warm-up: 500 iterations (the Swin base uses 1000).
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]

# AdamW, no weight decay on the neighborhood-attention bias tables (`rpb`) and on norms, fp16 with
# a static loss scale of 512 (upstream's Fp16OptimizerHook default; mmengine's is dynamic).
# On CPU use `--cfg-options optim_wrapper.type=OptimWrapper` (AmpOptimWrapper needs a GPU).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.0,
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)
