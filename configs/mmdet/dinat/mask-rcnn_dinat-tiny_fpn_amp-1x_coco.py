# Mask R-CNN + DiNAT-Tiny, COCO 1x (12 epochs), single-scale (1333, 800) training: the short
# schedule for quick experiments (no published number; the 3x recipe is the reference).
_base_ = ['../nat/mask-rcnn_nat-tiny_fpn_amp-1x_coco.py']

model = dict(
    backbone=dict(
        type='DiNAT',
        dilations='coco',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_tiny_in1k_224.pth'),
    )
)
