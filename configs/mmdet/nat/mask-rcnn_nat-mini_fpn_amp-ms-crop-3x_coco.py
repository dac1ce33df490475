# Mask R-CNN + NAT-Mini, COCO 3x. Box / mask AP 46.5 / 41.7.
_base_ = ['./mask-rcnn_nat-tiny_fpn_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='mini', init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_mini.pth')
    )
)
