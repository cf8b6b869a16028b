# Semantic FPN + Mobile-Former-294M, ADE20K 512x512, 40k iters. Recipe OURS (the paper has no
# segmentation run): the EfficientFormer one, AdamW lr 2e-4, wd 1e-4, poly (power 0.9, min lr
# 0), batch 4 x 8 GPUs, test sides resized to multiples of 32.
_base_ = ['./_base_/semfpn_ade20k_40k_adamw.py']

model = dict(
    backbone=dict(
        type='effbackbones.MobileFormer', arch='294m', drop_path_rate=0.0,
        # ImageNet-1k weights released by AAboys/MobileFormer (Google-Drive files of the model
        # mobile-former-294m, timm-0.3.4 CheckpointSaver layout: 'state_dict' / 'state_dict_ema')
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mobile-former-294m.pth.tar')),
    neck=dict(in_channels=[24, 48, 128, 192]))
