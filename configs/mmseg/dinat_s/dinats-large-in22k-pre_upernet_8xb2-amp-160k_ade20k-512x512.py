# UPerNet + DiNAT_s-Large (ImageNet-22k pre-trained), ADE20K, 160k, fp16 upstream (unlike DiNAT-L).
# mIoU 53.4 / 54.6 (multi-scale). Upstream's file
# (segmentation/configs/dinat_s/upernet_dinat_s_large_640x640_160k_ade20k.py) is named
# `..._640x640_...` and uses the "640" dilation schedule, but inherits the 512x512 ADE20K pipeline
# (crop 512, scale 2048x512); we reproduce what it ran, as for DiNAT-L.
_base_ = ['./dinats-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='large',
        dilations='ade20k-640',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_large_in22k_224.pth'),
    ),
    decode_head=dict(in_channels=[192, 384, 768, 1536]),
    auxiliary_head=dict(in_channels=768),
)
