# Cascade Mask R-CNN + DiNAT-Mini, COCO 3x. Box / mask AP 51.2 / 44.4.
_base_ = ['./cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='mini',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_mini_in1k_224.pth'),
    )
)
