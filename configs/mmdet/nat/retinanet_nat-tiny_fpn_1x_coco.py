# Example of the "new detector" pattern: start from the host library's config of the detector you
# want and swap in the NAT backbone (a one-stage detector shares no head keys with Mask R-CNN, so
# inheriting the NAT Mask R-CNN config would mean deleting all of it). No published number.
# Rule: `_delete_=True` on the backbone, neck `in_channels` = the backbone's `out_channels`.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['nat_mm'], allow_failed_imports=False)

# nat_mm's runtime (docs/checkpoints.md): checkpoints are read without running code from them
# and saved so that a kill never loses the last complete one.
runner_type = 'SafeLoadRunner'
default_hooks = dict(checkpoint=dict(type='CrashSafeCheckpointHook'))

model = dict(
    backbone=dict(
        _delete_=True,
        type='NAT',
        arch='tiny',
        kernel_size=7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/nat_tiny.pth'),
    ),
    # RetinaNet's FPN starts at stride 8 (start_level=1) but still takes all four maps.
    neck=dict(in_channels=[64, 128, 256, 512]),
)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0)}),
)
