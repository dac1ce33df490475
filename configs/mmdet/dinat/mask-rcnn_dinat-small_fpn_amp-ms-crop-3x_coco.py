# Mask R-CNN + DiNAT-Small, COCO 3x. Box / mask AP 49.3 / 44.0.
_base_ = ['./mask-rcnn_dinat-tiny_fpn_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_small_in1k_224.pth'),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
