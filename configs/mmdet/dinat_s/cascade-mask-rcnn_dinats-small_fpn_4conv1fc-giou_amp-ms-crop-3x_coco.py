# Cascade Mask R-CNN + DiNAT_s-Small, COCO 3x, fp16 (NAT repo
# detection/configs/dinat_s/cascade_mask_rcnn_dinat_s_small_3x_coco.py). Box / mask AP 52.3 / 45.2.
_base_ = ['./cascade-mask-rcnn_dinats-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_s_small_in1k_224.pth'),
    )
)
