# Mask2Former + NAT-Tiny, ADE20K semantic 512x512, 160k: the single-GPU-friendly variant (no
# published number), with Mask2Former's optimizer as the DiNAT-L recipe has it. Pipeline and
# multi-scale test as mmseg's Swin-T Mask2Former.
_base_ = ['mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py']

# Replaces the inherited import list, so mmdet's Mask2Former parts must be listed again.
custom_imports = dict(imports=['mmdet.models', 'nat_mm'], allow_failed_imports=False)

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
