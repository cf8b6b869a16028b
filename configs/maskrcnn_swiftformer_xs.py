# Mask R-CNN + SwiftFormer-XS + FPN, COCO 1x: the SwiftFormer paper recipe (Sec. 4.1; results in
# Table 3): AdamW lr 2e-4, 12 epochs (steps 8/11), 1333x800, total batch 32 = 4 images x 8 GPUs
# (auto_scale_lr base 32), wd 1e-4, 500 warm-up iters (see _base_/maskrcnn_swiftformer_recipe.py).
_base_ = ['./_base_/maskrcnn_swiftformer_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.SwiftFormer', arch='xs', drop_path_rate=0.0,
        # ImageNet-1k weights released by Amshaker/SwiftFormer (SwiftFormer_XS.pth, {'model': ...}),
        # or timm's swiftformer_xs: both layouts load; the report is logged.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/SwiftFormer_XS.pth')),
    neck=dict(in_channels=[48, 56, 112, 220]))
