# Mask R-CNN + LeViT-384 + FPN, COCO 1x. Recipe OURS (no LeViT paper numbers): 12 epochs (steps
# 8/11), 500 linear warm-up iterations from 1e-3, batch 2 x 8 GPUs, 1333x800, with the LeViT
# optimiser of _base_/maskrcnn_levit_recipe.py.
_base_ = ['./_base_/maskrcnn_levit_recipe.py']

model = dict(
    backbone=dict(
        # maps at strides 4/8/16/32 (out_indices 0-3): the stem's stride-4/8 maps and the ends of
        # stages 0 and 1; the stride-64 stage 2 is not run (its weights are loaded, unused)
        type='effbackbones.LeViT', arch='384', out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
        # ImageNet-1k weights released by facebookresearch/LeViT
        # (LeViT-384-9bdaf2e2.pth, {'model': ...}), or timm's levit_384 / levit_conv_384
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/LeViT-384-9bdaf2e2.pth')),
    neck=dict(in_channels=[96, 192, 384, 512]))
