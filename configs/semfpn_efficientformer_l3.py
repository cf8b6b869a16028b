# Semantic FPN + EfficientFormer-L3, ADE20K 512x512, 40k iters: the EfficientFormer paper recipe
# (official segmentation/configs/sem_fpn/fpn_efficientformer_l3_ade20k_40k.py): AdamW lr 2e-4,
# wd 1e-4, poly (power 0.9, min lr 0), batch 4 x 8 GPUs, test sides resized to multiples of 32.
_base_ = ['./_base_/semfpn_ade20k_40k_adamw.py']

model = dict(
    backbone=dict(
        type='effbackbones.EfficientFormer', arch='l3', drop_path_rate=0.0,
        # the official ADE20K backbone (segmentation/backbone.py, Attention(resolution=16)):
        # attention_biases_seg (8, 256) on a 16x16 grid, not the detection 25x25 one; a released
        # efficientformer_l3_ade20k.pth fits only this grid
        bias_mode='official', bias_grid=16,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientformer_l3_300d.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
