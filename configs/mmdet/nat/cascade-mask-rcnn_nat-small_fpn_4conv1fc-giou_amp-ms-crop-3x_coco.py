# Cascade Mask R-CNN + NAT-Small, COCO 3x. Box / mask AP 52.0 / 44.9.
_base_ = ['./cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='small', init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_small.pth')
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
