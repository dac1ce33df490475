# Cascade Mask R-CNN (4conv1fc, GIoU) + DiNAT-Tiny, COCO 3x: the NAT-Tiny recipe with DiNAT's COCO
# dilation schedule (NAT repo detection/configs/dinat/cascade_mask_rcnn_dinat_tiny_3x_coco.py).
# Box / mask AP 52.2 / 45.1. Family root: the other sizes override only what differs.
_base_ = ['../nat/cascade-mask-rcnn_nat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        type='DiNAT',
        dilations='coco',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_tiny_in1k_224.pth'),
    )
)
