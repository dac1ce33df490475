# Cascade Mask R-CNN + DiNAT_s-Large (ImageNet-22k pre-trained), COCO 3x, lr 5e-5, fp16 upstream
# (unlike DiNAT-L) (NAT repo detection/configs/dinat_s/cascade_mask_rcnn_dinat_s_large_3x_coco.py).
# Box / mask AP 54.8 / 47.2.
_base_ = ['./cascade-mask-rcnn_dinats-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_large_in22k_224.pth'),
    ),
    neck=dict(in_channels=[192, 384, 768, 1536]),
)

optim_wrapper = dict(optimizer=dict(lr=0.00005))
