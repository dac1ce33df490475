# Cascade Mask R-CNN + NAT-Mini, COCO 3x. Box / mask AP 50.3 / 43.6.
_base_ = ['./cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='mini',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_mini.pth'),
    )
)
