# UPerNet + DiNAT_s-Base, ADE20K 512x512, 160k, fp16 (NAT repo
# segmentation/configs/dinat_s/upernet_dinat_s_base_512x512_160k_ade20k.py). mIoU 49.4 / 50.2.
_base_ = ['./dinats-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_base_in1k_224.pth'),
    ),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)
