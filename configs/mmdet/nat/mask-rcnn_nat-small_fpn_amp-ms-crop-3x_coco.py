# Mask R-CNN + NAT-Small, COCO 3x. Box / mask AP 48.4 / 43.2.
_base_ = ['./mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_small.pth'),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
