# Semantic FPN + EfficientFormerV2-S1, ADE20K 512x512, 40k iters: the EfficientFormerV2 paper
# recipe (official segmentation/configs/sem_fpn/fpn_efficientformerv2_s1_ade20k_40k.py): AdamW
# lr 2e-4, wd 1e-4, poly (power 0.9, min lr 1e-6), batch 4 x 8 GPUs, test sides resized to
# multiples of 32, drop_path_rate 0.0 (official efficientformerv2_s1_feat).
_base_ = ['./_base_/semfpn_efficientformerv2_recipe.py']

model = dict(
    backbone=dict(
        type='effbackbones.EfficientFormerV2', arch='s1', drop_path_rate=0.0,
        # the official ADE20K backbone (segmentation/backbonev2.py, resolution 512): dense tables
        # on 16x16 stage grids and a 32x32 key grid in the attention downsample ((8, 256) and
        # (8, 1024)), not the detection resolution 800 (25x25 / 50x50)
        bias_mode='official', bias_grid=16,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/eformer_s1_450.pth')),
    neck=dict(in_channels=[32, 48, 120, 224]))
