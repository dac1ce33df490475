# Mask R-CNN + DiNAT_s-Small, COCO 3x, fp16 (NAT repo
# detection/configs/dinat_s/mask_rcnn_dinat_s_small_3x_coco.py). Box / mask AP 48.6 / 43.5.
_base_ = ['./mask-rcnn_dinats-tiny_fpn_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_small_in1k_224.pth'),
    )
)
