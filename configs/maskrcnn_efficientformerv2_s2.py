# Mask R-CNN + EfficientFormerV2-S2 + FPN, COCO 1x: the EfficientFormerV2 paper recipe (official
# snap-research/EfficientFormer detection/configs/mask_rcnn_efficientformerv2_s2_fpn_1x_coco.py):
# AdamW lr 2e-4, wd 0.05, 12 epochs (steps 8/11), 500 linear warm-up iterations from ratio 1e-6,
# batch 2 x 8 GPUs, 1333x800, drop_path_rate 0.02 (official efficientformerv2_s2_feat).
_base_ = ['./_base_/maskrcnn_efficientformerv2_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.EfficientFormerV2', arch='s2', drop_path_rate=0.02,
        # the official detection backbone (detection/backbonev2.py): attention_biases_seg tables
        # at resolution 800 (bias_grid default 25), learnt from zeros
        bias_mode='official',
        norm_eval=False,
        # ImageNet-1k weights released by snap-research/EfficientFormer
        # (eformer_s2_450.pth, {'model': ...}), or timm's efficientformerv2_s2
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/eformer_s2_450.pth')),
    neck=dict(in_channels=[32, 64, 144, 288]))
