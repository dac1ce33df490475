# UPerNet + DiNAT-Small, ADE20K 512x512, 160k. mIoU 48.9 / 49.9 (multi-scale).
_base_ = ['./dinat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_small_in1k_224.pth'),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
