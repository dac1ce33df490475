# Mask2Former + DiNAT-Large 11x11 (ImageNet-22k, RPB interpolated to kernel 11), ADE20K semantic
# 640x640, 160k: the published recipe (NAT repo mask2former/configs/ade20k/semantic-segmentation/
# dinat/, detectron2): kernel 11, the Mask2Former dilation schedule, drop_path 0.3, 100 queries,
# fp32. mIoU 58.1 (multi-scale). Pipeline, schedule and optimizer as mmseg's Swin-L Mask2Former.
_base_ = ['mmseg::mask2former/mask2former_swin-l-in22k-384x384-pre_8xb2-160k_ade20k-640x640.py']

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
    ),
)
