# Example of the "new head" pattern: inherit a NAT config and replace the head. Here the UPerNet
# decode head of NAT-Tiny becomes SegFormer's all-MLP head; backbone, auxiliary head, data,
# optimizer and schedule stay as inherited. No published number.
# Rule: `_delete_=True` drops the inherited head's keys; `in_channels` must list the backbone's
# `out_channels` (NAT-Tiny: 64, 128, 256, 512; Small: 96 x 2^i; Base: 128 x 2^i; Large: 192 x 2^i).
_base_ = ['./nat-tiny-in1k-pre_upernet_8xb2-amp-160k_ade20k-512x512.py']

model = dict(
    decode_head=dict(
        _delete_=True,
        type='SegformerHead',
        in_channels=[64, 128, 256, 512],
        in_index=[0, 1, 2, 3],
        channels=256,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
    )
)
