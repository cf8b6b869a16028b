# Semantic FPN + LeViT-256, ADE20K 512x512, 40k iters. Recipe OURS (no LeViT paper numbers): poly
# (power 0.9, min lr 0), batch 4 x 8 GPUs, test sides resized to multiples of 32, with the LeViT
# optimiser of _base_/semfpn_levit_recipe.py.
_base_ = ['./_base_/semfpn_levit_recipe.py']

model = dict(
    backbone=dict(
        # maps at strides 4/8/16/32 (out_indices 0-3): the stem's stride-4/8 maps and the ends of
        # stages 0 and 1; the stride-64 stage 2 is not run (its weights are loaded, unused)
        type='effbackbones.LeViT', arch='256', out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
        # ImageNet-1k weights released by facebookresearch/LeViT
        # (LeViT-256-13b5763e.pth, {'model': ...}), or timm's levit_256 / levit_conv_256
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/LeViT-256-13b5763e.pth')),
    neck=dict(in_channels=[64, 128, 256, 384]))
