# Mask R-CNN + EfficientFormer-L3 + FPN, COCO 1x: the EfficientFormer paper recipe (official
# snap-research/EfficientFormer detection/configs/mask_rcnn_efficientformer_l3_fpn_1x_coco.py):
# AdamW lr 2e-4, wd 1e-4, 12 epochs (steps 8/11), 500 linear warm-up iterations from ratio 1e-3,
# batch 2 x 8 GPUs, 1333x800. Warm-up 1e-3, not the 1e-6 of the official repository's HEAD: 1e-3
# is what the v1 code release (7916a85) trained with; 1e-6 came with the V2 commit 733456e (see
# _base_/maskrcnn_efficientformer_recipe.py).
# BatchNorms train as plain per-GPU BN, as in the official v1 dense backbone (no SyncBN there).
_base_ = ['./_base_/maskrcnn_efficientformer_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.EfficientFormer', arch='l3', drop_path_rate=0.0,
        # the official detection backbone (detection/backbone.py): new attention_biases_seg
        # tables on the 25x25 grid (bias_grid default), learnt from zeros
        bias_mode='official',
        # ImageNet-1k weights released by snap-research/EfficientFormer
        # (efficientformer_l3_300d.pth, {'model': ...}), or timm's efficientformer_l3
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientformer_l3_300d.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
