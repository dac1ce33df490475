# Cascade Mask R-CNN + NAT-Base, COCO 3x. Box / mask AP 52.3 / 45.1.
_base_ = ['./cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_base.pth'),
    ),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
