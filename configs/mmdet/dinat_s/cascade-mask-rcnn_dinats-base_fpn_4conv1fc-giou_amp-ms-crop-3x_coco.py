# Cascade Mask R-CNN + DiNAT_s-Base, COCO 3x, fp16, lr 7.5e-5 (NAT repo
# detection/configs/dinat_s/cascade_mask_rcnn_dinat_s_base_3x_coco.py). Box / mask AP 52.6 / 45.3.
_base_ = ['./cascade-mask-rcnn_dinats-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_base_in1k_224.pth'),
    ),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)

optim_wrapper = dict(optimizer=dict(lr=0.000075))
