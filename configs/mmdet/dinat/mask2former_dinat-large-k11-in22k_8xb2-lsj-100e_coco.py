# Mask2Former + DiNAT-Large 11x11 (ImageNet-22k, RPB interpolated to kernel 11), COCO instance segmentation, mask AP 50.8:
# the published recipe (NAT repo mask2former/configs/coco/*/dinat/, detectron2): kernel 11, the
# Mask2Former dilation schedule, drop_path 0.3, 200 queries, 100 epochs, batch 8 x 2, fp32.
_base_ = ['../nat/mask2former_nat-tiny_8xb2-lsj-50e_coco.py']

model = dict(
    backbone=dict(
        type='DiNAT',
        arch='large',
        kernel_size=11,
        dilations='mask2former',
        init_cfg=dict(
            type='Pretrained', checkpoint='checkpoints/dinat_large_in22k_224_11x11interp.pth'
        ),
    ),
    panoptic_head=dict(num_queries=200, in_channels=[192, 384, 768, 1536]),
)

# Batch 16 as upstream ran it: 8 GPUs x 2 (mmdet's Swin-L config runs 16 x 1). On another number
# of GPUs, `--auto-scale-lr` scales the lr from this base.
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)

# 100 epochs = 737500 iterations at batch 16 (as mmdet's Swin-L Mask2Former).
max_iters = 737500
param_scheduler = dict(end=max_iters, milestones=[655556, 710184])
interval = 5000
dynamic_intervals = [(max_iters // interval * interval + 1, max_iters)]
train_cfg = dict(max_iters=max_iters, val_interval=interval, dynamic_intervals=dynamic_intervals)
