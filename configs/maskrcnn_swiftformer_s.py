# Mask R-CNN + SwiftFormer-S + FPN, COCO 1x (SwiftFormer paper, Table 4 recipe):
# AdamW lr 2e-4, wd 1e-4, 12 epochs (steps 8/11), 500 warm-up iters, batch 2 x 8 GPUs.
_base_ = ['./_base_/maskrcnn_fpn_1x_coco_adamw.py']

model = dict(
    backbone=dict(
        type='effbackbones.SwiftFormer', arch='s', drop_path_rate=0.0,
        # ImageNet-1k weights released by Amshaker/SwiftFormer (SwiftFormer_S.pth, {'model': ...}),
        # or timm's swiftformer_s: both layouts load; the report is logged.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/SwiftFormer_S.pth')),
    neck=dict(in_channels=[48, 64, 168, 224]))
