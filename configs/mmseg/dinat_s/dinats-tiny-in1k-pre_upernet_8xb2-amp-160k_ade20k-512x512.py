# UPerNet + DiNAT_s-Tiny, ADE20K 512x512, 160k, fp16: the NAT-Tiny recipe (the same heads,
# pipeline, schedule and optimizer upstream) with the DiNAT_s backbone and its ADE20K-512 dilation
# schedule (NAT repo segmentation/configs/dinat_s/upernet_dinat_s_tiny_512x512_160k_ade20k.py).
# mIoU 46.0 / 47.4 (multi-scale). Family root: the other sizes override only what differs.
_base_ = ['../nat/nat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        type='DiNATs',
        arch='tiny',
        dilations='ade20k-512',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_tiny_in1k_224.pth'),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
