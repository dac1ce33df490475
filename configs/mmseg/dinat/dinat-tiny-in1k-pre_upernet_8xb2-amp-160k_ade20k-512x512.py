# UPerNet + DiNAT-Tiny, ADE20K 512x512, 160k: the NAT-Tiny recipe with DiNAT's ADE20K-512 dilation
# schedule (NAT repo segmentation/configs/dinat/upernet_dinat_tiny_512x512_160k_ade20k.py).
# mIoU 47.8 / 48.8 (multi-scale). Family root: the other sizes override only what differs.
_base_ = ['../nat/nat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        type='DiNAT',
        dilations='ade20k-512',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_tiny_in1k_224.pth'),
    )
)
