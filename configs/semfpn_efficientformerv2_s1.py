# Semantic FPN + EfficientFormerV2-S1, ADE20K 512x512, 40k iters: the EfficientFormerV2 paper
# recipe (official segmentation/configs/sem_fpn/fpn_efficientformerv2_s1_ade20k_40k.py): AdamW
# lr 2e-4, wd 1e-4, poly (power 0.9, min lr 1e-6), batch 4 x 8 GPUs, test sides resized to
# multiples of 32, drop_path_rate 0.0 (official efficientformerv2_s1_feat).
_base_ = ['./_base_/semfpn_efficientformerv2_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.EfficientFormerV2', arch='s1', drop_path_rate=0.0,
        bias_mode='official',
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/eformer_s1_450.pth')),
    neck=dict(in_channels=[32, 48, 120, 224]))
