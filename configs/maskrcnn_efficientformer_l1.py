# Mask R-CNN + EfficientFormer-L1 + FPN, COCO 1x: the EfficientFormer paper recipe (official
# snap-research/EfficientFormer detection/configs/mask_rcnn_efficientformer_l1_fpn_1x_coco.py):
# AdamW lr 2e-4, wd 1e-4, 12 epochs (steps 8/11), 500 linear warm-up iterations from ratio 1e-6
# (the official _base_/schedules/schedule_1x.py), batch 2 x 8 GPUs, 1333x800.
# BatchNorms train as plain per-GPU BN, as in the official v1 dense backbone (no SyncBN there).
_base_ = ['./_base_/maskrcnn_efficientformer_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.EfficientFormer', arch='l1', drop_path_rate=0.0,
        # the official dense code: new 25x25 attention_biases_seg tables, learnt from zeros
        bias_mode='official',
        # ImageNet-1k weights released by snap-research/EfficientFormer
        # (efficientformer_l1_300d.pth, {'model': ...}), or timm's efficientformer_l1
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientformer_l1_300d.pth')),
    neck=dict(in_channels=[48, 96, 224, 448]))
