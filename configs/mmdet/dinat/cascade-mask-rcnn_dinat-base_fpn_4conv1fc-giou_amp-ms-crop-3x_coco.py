# Cascade Mask R-CNN + DiNAT-Base, COCO 3x, lr 7.5e-5. Box / mask AP 53.4 / 46.2.
_base_ = ['./cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_base_in1k_224.pth'),
    ),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)

optim_wrapper = dict(optimizer=dict(lr=0.000075))
