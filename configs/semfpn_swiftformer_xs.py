# Semantic FPN + SwiftFormer-XS, ADE20K 512x512, 40k iters (SwiftFormer paper recipe):
# AdamW lr 2e-4, wd 1e-4, poly (power 0.9), batch 4 x 8 GPUs.
_base_ = ['./_base_/semfpn_ade20k_40k_adamw.py']

model = dict(
    backbone=dict(
        type='effbackbones.SwiftFormer', arch='xs', drop_path_rate=0.0,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/SwiftFormer_XS.pth')),
    neck=dict(in_channels=[48, 56, 112, 220]))
