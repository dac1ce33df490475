# UPerNet + DiNAT-Mini, ADE20K 512x512, 160k. mIoU 45.8 / 47.2 (multi-scale).
_base_ = ['./dinat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='mini',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_mini_in1k_224.pth'),
    )
)
