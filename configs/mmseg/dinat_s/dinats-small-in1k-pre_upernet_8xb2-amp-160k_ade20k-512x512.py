# UPerNet + DiNAT_s-Small, ADE20K 512x512, 160k, fp16 (NAT repo
# segmentation/configs/dinat_s/upernet_dinat_s_small_512x512_160k_ade20k.py). mIoU 48.6 / 49.9.
_base_ = ['./dinats-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_small_in1k_224.pth'),
    )
)
