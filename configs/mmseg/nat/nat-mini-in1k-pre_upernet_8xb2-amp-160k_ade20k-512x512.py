# UPerNet + NAT-Mini, ADE20K 512x512, 160k. mIoU 45.1 / 46.4 (multi-scale).
_base_ = ['./nat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='mini',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_mini.pth'),
    )
)
