# UPerNet + DiNAT-Large (ImageNet-22k pre-trained), ADE20K, 160k, fp32 (no AMP upstream).
# mIoU 54.0 / 54.9 (multi-scale). Upstream's file is named `..._640x640_...` and uses the
# "640" dilation schedule, but it inherits the 512x512 ADE20K pipeline (crop 512, scale 2048x512);
# we reproduce what it ran: the 512x512 pipeline with the "640" schedule.
_base_ = ['./dinat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='large',
        dilations='ade20k-640',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_large_in22k_224.pth'),
    ),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768),
)

# fp32: the whole wrapper again, as OptimWrapper takes no loss_scale (the AMP one's).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)
