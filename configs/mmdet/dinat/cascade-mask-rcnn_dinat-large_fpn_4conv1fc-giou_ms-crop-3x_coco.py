# Cascade Mask R-CNN + DiNAT-Large (ImageNet-22k pre-trained), COCO 3x, lr 7.5e-5, trained in
# fp32 upstream (no AMP). Box / mask AP 55.3 / 47.8.
_base_ = ['./cascade-mask-rcnn_dinat-tiny_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

model = dict(
    backbone=dict(
        arch='large',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/dinat_large_in22k_224.pth'),
    ),
    neck=dict(in_channels=[192, 384, 768, 1536]),
)

# fp32: the whole wrapper again, as OptimWrapper takes no loss_scale (the AMP one's).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.000075, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)
