# Mask R-CNN + DiNAT-Mini, COCO 3x. Box / mask AP 47.2 / 42.5.
_base_ = ['./mask-rcnn_dinat-tiny_fpn_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='mini',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_mini_in1k_224.pth'),
    )
)
