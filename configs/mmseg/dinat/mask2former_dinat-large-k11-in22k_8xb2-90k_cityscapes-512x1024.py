# Mask2Former + DiNAT-Large 11x11 (ImageNet-22k, RPB interpolated to kernel 11), Cityscapes
# semantic 512x1024, 90k: the published recipe (NAT repo mask2former/configs/cityscapes/
# semantic-segmentation/dinat/maskformer2_dinat_large_IN21k_384_bs16_90k.yaml, detectron2):
# kernel 11, the Mask2Former dilation schedule, drop_path 0.3, 100 queries, fp32, batch 8 x 2.
# mIoU 84.5 (multi-scale). Schedule, crop and single-scale test as mmseg's Swin-L Mask2Former;
# crop constraint and multi-scale test as upstream (below).
_base_ = ['mmseg::mask2former/mask2former_swin-l-in22k-384x384-pre_8xb2-90k_cityscapes-512x1024.py']

# Replaces the inherited import list, so mmdet's Mask2Former parts must be listed again.
custom_imports = dict(imports=['mmdet.models', 'nat_mm'], allow_failed_imports=False)

# nat_mm's runtime (docs/checkpoints.md): checkpoints are read without running code from them
# and saved so that a kill never loses the last complete one.
runner_type = 'SafeLoadRunner'
default_hooks = dict(checkpoint=dict(type='CrashSafeCheckpointHook'))

model = dict(
    backbone=dict(
        _delete_=True,
        type='DiNAT',
        arch='large',
        kernel_size=11,
        dilations='mask2former',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(
            type='Pretrained', checkpoint='checkpoints/dinat_large_in22k_224_11x11interp.pth'
        ),
    ),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
)

# Mask2Former's optimizer (detectron2): backbone lr x0.1; no weight decay on norms (every one, by
# type: NATOptimWrapperConstructor) and embeddings, but `rpb` keeps it (rpb_decay_mult=1.0).
embed_multi = dict(lr_mult=1.0, decay_mult=0.0)
optim_wrapper = dict(
    constructor='NATOptimWrapperConstructor',
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            'backbone': dict(lr_mult=0.1, decay_mult=1.0),
            'query_embed': embed_multi,
            'query_feat': embed_multi,
            'level_embed': embed_multi,
        },
        norm_decay_mult=0.0,
        rpb_decay_mult=1.0,
    ),
)

# The host's crop rejects crops where one class covers > 75% (cat_max_ratio=0.75); upstream has no
# such constraint (INPUT.CROP.SINGLE_CATEGORY_MAX_AREA: 1.0).
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomChoiceResize',
        scales=[int(x * 0.1 * 1024) for x in range(5, 21)],
        resize_type='ResizeShortestEdge',
        max_size=4096,
    ),
    dict(type='RandomCrop', crop_size=(512, 1024)),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# Multi-scale test as upstream (TEST.AUG): short side 512-1792 in steps of 256, long side at most
# 4096, plus flip. The host's tta_pipeline rescales the original image by 0.5-1.75 instead.
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale=(4096, short), keep_ratio=True)
                for short in (512, 768, 1024, 1280, 1536, 1792)
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
