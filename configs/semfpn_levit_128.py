# Semantic FPN + LeViT-128, ADE20K 512x512, 40k iters. Recipe OURS (no LeViT paper numbers): poly
# (power 0.9, min lr 0), batch 4 x 8 GPUs, test sides resized to multiples of 32, with the LeViT
# optimiser of _base_/semfpn_levit_recipe.py.
_base_ = ['./_base_/semfpn_levit_recipe.py']

model = dict(
    backbone=dict(
        # maps at strides 4/8/16/32 (out_indices 0-3): the stem's stride-4/8 maps and the ends of
        # stages 0 and 1; the stride-64 stage 2 is not run (its weights are loaded, unused)
        type='effbackbones.LeViT', arch='128', out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
        # ImageNet-1k weights released by facebookresearch/LeViT
        # (LeViT-128-b88c2750.pth, {'model': ...}), or timm's levit_128 / levit_conv_128
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/LeViT-128-b88c2750.pth')),
    neck=dict(in_channels=[32, 64, 128, 256]))
