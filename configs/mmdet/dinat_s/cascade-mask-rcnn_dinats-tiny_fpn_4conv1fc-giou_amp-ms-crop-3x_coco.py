# Cascade Mask R-CNN (4conv1fc, GIoU) + DiNAT_s-Tiny, COCO 3x, fp16: the NAT-Tiny recipe with the
# DiNAT_s backbone and its COCO dilation schedule (NAT repo
# detection/configs/dinat_s/cascade_mask_rcnn_dinat_s_tiny_3x_coco.py). Box / mask AP 51.0 / 44.1.
# Family root: the other sizes override only what differs.
_base_ = ['../nat/cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        type='DiNATs',
        arch='tiny',
        dilations='coco',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_tiny_in1k_224.pth'),
    ),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
