# UPerNet + DiNAT-Base, ADE20K 512x512, 160k. mIoU 49.6 / 50.4 (multi-scale).
_base_ = ['./dinat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_base_in1k_224.pth'),
    ),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)
