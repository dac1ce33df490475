# UPerNet + NAT-Tiny, ADE20K 512x512, 160k iterations: the published recipe (NAT repo
# segmentation/configs/nat/upernet_nat_tiny_512x512_160k_ade20k.py, mmseg 0.x) on mmseg 1.x.
# mIoU 47.1 single-scale / 48.4 multi-scale (`tools/test.py --tta`, mmseg 0.x's `--aug-test`).
# Family root: the other sizes override only what differs.
# The host base already has UPerHead + FCN auxiliary head on stage 2, AdamW lr 6e-5 / wd 0.01 and
# poly decay after a 1500-iteration linear warm-up.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

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
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_tiny.pth'),
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256),
)

# No weight decay on the neighborhood-attention bias tables (`rpb`) and on norms, fp16 with
# a static loss scale of 512 (upstream's Fp16OptimizerHook default; mmengine's is dynamic).
# On CPU use `--cfg-options optim_wrapper.type=OptimWrapper` (AmpOptimWrapper needs a GPU).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale=512.0,
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)

# Multi-scale test as mmseg 0.x's `--aug-test`: each image is fitted into (2048r, 512r) for r in
# 0.5-1.75, plus flip. The host's tta_pipeline rescales the original image by r instead.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True)
                for r in img_ratios
            ],
            [
                dict(type='RandomFlip', prob=0.0, direction='horizontal'),
                dict(type='RandomFlip', prob=1.0, direction='horizontal'),
            ],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ],
    ),
]
