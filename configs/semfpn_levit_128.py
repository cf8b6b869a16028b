# Semantic FPN + LeViT-128, ADE20K 512x512, 40k iters. Recipe OURS (no LeViT paper numbers): poly
# (power 0.9, min lr 0), batch 4 x 8 GPUs, test sides resized to multiples of 32, with the LeViT
# optimiser below.
_base_ = ['./_base_/semfpn_ade20k_40k_adamw.py']

model = dict(
    backbone=dict(
        # maps at strides 4/8/16/32 (out_indices 0-3): the stem's stride-4/8 maps and the ends of
        # stages 0 and 1; the stride-64 stage 2 is not run (its weights are loaded, unused)
        type='effbackbones.LeViT', arch='128', out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
        # ImageNet-1k weights released by facebookresearch/LeViT
        # (LeViT-128-b88c2750.pth, {'model': ...}), or timm's levit_128 / levit_conv_128
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/LeViT-128-b88c2750.pth')),
    neck=dict(in_channels=[32, 64, 128, 256]))

# LeViT optimiser (OURS; the LeViT paper has no dense-prediction runs): AdamW lr 1e-4, wd 0.05 and
# no weight decay on the attention-bias tables (every `*.attention_biases` parameter of the
# backbone), as used for the LeViT-derived EfficientViT (microsoft/Cream) detection configs.
optim_wrapper = dict(
    optimizer=dict(lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'attention_biases': dict(decay_mult=0.0)}))
